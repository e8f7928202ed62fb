"""Strategy state for checkpoints: what a strategy carries across experiences beyond model and
optimizer, as plain data (tensors, numbers, strings, lists, dicts) for torch.save and
torch.load(weights_only=True).

Memories (replay buffer, A-GEM buffers) are saved as their token blocks, so a restored run
replays exactly the same blocks without depending on how Avalanche nested its subsets;
regularizer state (EWC, SI, MAS) as CPU tensors keyed by parameter name; the clock because EWC,
SI and MAS read `clock.train_exp_counter`; our own plugins through their
`state_dict(strategy)` / `load_state_dict(strategy, state)` methods.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from avalanche.benchmarks.utils import AvalancheDataset, DataAttribute
from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader
from avalanche.benchmarks.utils.flat_data import ConstantSequence
from avalanche.training.plugins import AGEMPlugin, EWCPlugin, MASPlugin, ReplayPlugin, SynapticIntelligencePlugin
from avalanche.training.plugins.clock import Clock
from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer
from avalanche.training.utils import ParamData
from torch.utils.data import DataLoader, TensorDataset

STATE_FORMAT = 1


def _blocks(dataset) -> dict:
    """A dataset of (input_ids[T], target_ids[T]) blocks as two [N, T] tensors, in order."""
    inputs, targets = [], []
    # Its own generator: a DataLoader iterator draws a seed even unshuffled, and saving a checkpoint
    # must not move the global RNG (under torchrun only rank 0 saves; the ranks would drift apart).
    loader = DataLoader(dataset, batch_size=256, shuffle=False, collate_fn=getattr(dataset, "collate_fn", None),
                        generator=torch.Generator())
    for x, y, *_ in loader:
        inputs.append(x)
        targets.append(y)
    if not inputs:
        return {"inputs": torch.zeros(0, 0, dtype=torch.int64), "targets": torch.zeros(0, 0, dtype=torch.int64)}
    return {"inputs": torch.cat(inputs).cpu(), "targets": torch.cat(targets).cpu()}


def _blocks_dataset(blocks: dict) -> AvalancheDataset:
    """Saved blocks as an AvalancheDataset shaped like the benchmark's (items (x, y), task label 0 attribute)."""
    inputs, targets = blocks["inputs"], blocks["targets"]
    return AvalancheDataset([TensorDataset(inputs, targets)],
                            data_attributes=[DataAttribute(ConstantSequence(0, len(inputs)), "targets_task_labels")])


def _tensors(params: dict | None) -> dict | None:
    return None if params is None else {name: pd.data.detach().cpu().clone() for name, pd in params.items()}


def _param_data(tensors: dict | None, device) -> dict | None:
    if tensors is None:
        return None
    # A copy: plugins update these in place, and a checkpoint's state may be applied twice.
    return {name: ParamData(name, init_tensor=t.to(device, copy=True), device=device) for name, t in tensors.items()}


_CLOCK_COUNTERS = ("train_iterations", "train_exp_counter", "train_exp_epochs", "train_exp_iterations",
                   "train_epoch_iterations", "total_iterations")


def _clock_state(clock: Clock) -> dict:
    return {key: int(getattr(clock, key)) for key in _CLOCK_COUNTERS}


def _save_replay(plugin: ReplayPlugin) -> dict:
    policy = plugin.storage_policy
    if not isinstance(policy, ExperienceBalancedBuffer):
        raise TypeError(f"cannot checkpoint a {type(policy).__name__} replay buffer")
    groups = [{"key": int(key), "max_size": group.max_size, "weights": group._buffer_weights.clone(),
               **_blocks(group.buffer)} for key, group in policy.buffer_groups.items()]
    return {"num_exps": policy._num_exps, "max_size": policy.max_size, "groups": groups}


def _load_replay(plugin: ReplayPlugin, state: dict, strategy) -> None:
    policy = plugin.storage_policy
    policy._num_exps, policy.max_size = int(state["num_exps"]), int(state["max_size"])
    policy.buffer_groups = {}
    for saved in state["groups"]:
        group = ReservoirSamplingBuffer(int(saved["max_size"]))
        group.buffer = _blocks_dataset(saved)
        group._buffer_weights = saved["weights"].clone()
        policy.buffer_groups[int(saved["key"])] = group


def _save_ewc(plugin: EWCPlugin) -> dict:
    return {"saved_params": {int(e): _tensors(p) for e, p in plugin.saved_params.items()},
            "importances": {int(e): _tensors(p) for e, p in plugin.importances.items()}}


def _load_ewc(plugin: EWCPlugin, state: dict, strategy) -> None:
    plugin.saved_params = defaultdict(dict, {int(e): _param_data(p, strategy.device)
                                             for e, p in state["saved_params"].items()})
    plugin.importances = defaultdict(dict, {int(e): _param_data(p, strategy.device)
                                            for e, p in state["importances"].items()})


def _save_si(plugin: SynapticIntelligencePlugin) -> dict:
    # The anchor weights, the importances, the accumulated path integral and the current
    # experience's trajectory (non-zero inside an experience). The per-iteration buffers
    # (old/new weights, gradient) are overwritten before their next use.
    return {"ewc_data": [_tensors(plugin.ewc_data[0]), _tensors(plugin.ewc_data[1])],
            "cum_trajectory": _tensors(plugin.syn_data["cum_trajectory"]),
            "trajectory": _tensors(plugin.syn_data["trajectory"])}


def _load_si(plugin: SynapticIntelligencePlugin, state: dict, strategy) -> None:
    # SI keeps its data on the CPU whatever the strategy's device.
    plugin.ewc_data = (_param_data(state["ewc_data"][0], "cpu"), _param_data(state["ewc_data"][1], "cpu"))
    cum = state["cum_trajectory"]
    plugin.syn_data = {key: _param_data({n: torch.zeros_like(t) for n, t in cum.items()}, "cpu")
                       for key in ("old_theta", "new_theta", "grad")}
    plugin.syn_data["cum_trajectory"] = _param_data(cum, "cpu")
    # (checkpoints of earlier versions, written at boundaries only, have no trajectory: zeros)
    plugin.syn_data["trajectory"] = _param_data(state.get("trajectory") or {n: torch.zeros_like(t)
                                                                           for n, t in cum.items()}, "cpu")


def _save_mas(plugin: MASPlugin) -> dict:
    return {"params": _tensors(plugin.params), "importance": _tensors(plugin.importance)}


def _load_mas(plugin: MASPlugin, state: dict, strategy) -> None:
    plugin.params = _param_data(state["params"], strategy.device)
    plugin.importance = _param_data(state["importance"], strategy.device)


def _save_agem(plugin: AGEMPlugin) -> dict:
    return {"buffers": [_blocks(buffer) for buffer in plugin.buffers]}


def _load_agem(plugin: AGEMPlugin, state: dict, strategy) -> None:
    # Rebuilt as AGEMPlugin.update_memory leaves it: a fresh, not yet started memory iterator.
    plugin.buffers = [_blocks_dataset(b) for b in state["buffers"]]
    if plugin.buffers:
        plugin.buffer_dataloader = GroupBalancedInfiniteDataLoader(
            plugin.buffers, batch_size=plugin.sample_size // len(plugin.buffers), num_workers=0,
            pin_memory=False, persistent_workers=False)
        plugin.buffer_dliter = iter(plugin.buffer_dataloader)


def _load_clock(clock: Clock, state: dict, strategy) -> None:
    for key in _CLOCK_COUNTERS:
        setattr(clock, key, int(state[key]))


_AVALANCHE_STATE = {
    Clock: (_clock_state, _load_clock),
    ReplayPlugin: (_save_replay, _load_replay),
    EWCPlugin: (_save_ewc, _load_ewc),
    SynapticIntelligencePlugin: (_save_si, _load_si),
    MASPlugin: (_save_mas, _load_mas),
    AGEMPlugin: (_save_agem, _load_agem),
}


def _avalanche_handler(plugin):
    return next((handler for cls, handler in _AVALANCHE_STATE.items() if isinstance(plugin, cls)), None)


def _stateful_plugins(strategy) -> dict[str, object]:
    """Plugins with state, keyed by class name (two stateful plugins of one class are refused)."""
    out: dict[str, object] = {}
    for plugin in strategy.plugins:
        if _avalanche_handler(plugin) or callable(getattr(plugin, "state_dict", None)):
            key = type(plugin).__name__
            if key in out:
                raise ValueError(f"two {key} plugins: their checkpoint state would collide")
            out[key] = plugin
    return out


def _check_plain(value, where: str) -> None:
    """Fail at save time, with the path, on anything torch.load(weights_only=True) would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (torch.Tensor, bool, int, float, str))):
        raise TypeError(f"{where}: {type(value).__name__} cannot go into a weights-only checkpoint")


def strategy_state_dict(strategy) -> dict:
    """Everything `strategy` carries across experiences beyond the model and optimizer state.

    Call at an experience boundary (after `train(exp)`). The result holds only tensors (on the
    CPU), numbers, strings, lists and dicts: save it with torch.save, load it with
    torch.load(weights_only=True). It does not include RNG states: restore those separately.
    """
    plugins = {}
    for key, plugin in _stateful_plugins(strategy).items():
        handler = _avalanche_handler(plugin)
        plugins[key] = handler[0](plugin) if handler else plugin.state_dict(strategy)
    state = {"format": STATE_FORMAT, "optimizer_steps": strategy.optimizer_steps, "plugins": plugins}
    _check_plain(state, "strategy_state")
    return state


def load_strategy_state(strategy, state: dict) -> None:
    """Restore `strategy_state_dict` into a freshly built strategy of the same configuration.

    Load the model's weights first (a distillation teacher equal to the model at the boundary
    is rebuilt from it) and call this before the next `train`.
    """
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"strategy state format {state.get('format')!r} is not {STATE_FORMAT}")
    plugins = _stateful_plugins(strategy)
    saved = state["plugins"]
    if set(plugins) != set(saved):
        raise ValueError(f"strategy state is for plugins {sorted(saved)}, this strategy has {sorted(plugins)}")
    for key, plugin in plugins.items():
        handler = _avalanche_handler(plugin)
        if handler:
            handler[1](plugin, saved[key], strategy)
        else:
            plugin.load_state_dict(strategy, saved[key])
    strategy.optimizer_steps = int(state["optimizer_steps"])
