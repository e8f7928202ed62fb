"""A pretrained Hugging Face causal LM as the harness's model (`model.hf`), PEER layers retrofitted.

`load_pretrained` loads the model with `transformers` from local files only (a folder, or a name in
the local Hugging Face cache; nothing is downloaded, `trust_remote_code` only when the config says
so) and puts PEER layers into the blocks named by `model.ffn_layers` (`experts.retrofit`): beside
the block's MLP with every expert's output vector at zero ("parallel": the model computes what the
pretrained one did) or in its place ("replace"). `PretrainedLM` wraps it with what the harness
asks of `lifelong.model.LanguageModel` (logits from token ids, the expert layers, FLOPs and
parameter counts, the parameter groups of trainable scopes), so every strategy, growth, scope,
checkpoint and metric runs on it unchanged. The tokenizer is the model's (`RunConfig` sets
`stream.tokenizer`), so bits per byte charges each token its own UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from experts import PEER
from experts.retrofit import ARCHITECTURES, ParallelPEER, blocks_of, hidden_size, retrofit
from lifelong.adapters import is_adapter
from lifelong.errors import ConfigError
from lifelong.model import ModelConfig, capture_expert_inputs

# model_type -> the attribute of a block holding its attention (the MLP's is experts.retrofit's table)
ATTENTION = {"gpt2": "attn", "gpt_neox": "attention", "llama": "self_attn", "qwen2": "self_attn",
             "qwen3": "self_attn", "mistral": "self_attn"}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.hf needs the transformers package (pip install transformers)") from None
    return transformers


def model_folder(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """(the local folder `model.hf` names, the revision it holds): the folder itself (revision None),
    or the snapshot of a hub name in the local Hugging Face cache at `revision` (a branch, tag or
    commit; default "main"), with its commit hash. Nothing is contacted: loading from the folder
    keeps transformers from asking the hub about other files."""
    if revision is None and Path(name).is_dir():
        return name, None
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=name, revision=revision, local_files_only=True)
    except Exception:  # not cached (at that revision), not a repository id, or no huggingface_hub
        at = f" at revision {revision!r}" if revision is not None else ""
        raise ConfigError(f"model.hf: {name!r} is neither a model folder nor a model in the local Hugging Face "
                          f"cache{at} (nothing is downloaded)") from None
    return folder, Path(folder).name


def load_config(cfg: ModelConfig):
    """(the Hugging Face config of `model.hf`, its local folder, its revision), refused with one line
    when it is missing or unreadable, needs code of its own that was not allowed, or is of an
    architecture without a retrofit table entry."""
    transformers = _transformers()
    folder, revision = model_folder(cfg.hf, cfg.hf_revision)
    try:
        raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.hf: {folder} has no readable config.json ({_first_line(err)})") from None
    kind = raw.get("model_type", "") if isinstance(raw, dict) else ""
    # a type transformers knows loads with its own code even when the folder also ships some
    if "auto_map" in raw and not cfg.hf_trust_remote_code and kind not in transformers.CONFIG_MAPPING:
        raise ConfigError(f"model.hf: {cfg.hf} ships code of its own (transformers' trust_remote_code); set "
                          "model.hf_trust_remote_code=true only if you trust that code")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True,
                                                         trust_remote_code=cfg.hf_trust_remote_code)
    except Exception as err:  # transformers raises ValueError, KeyError, OSError, ... for what it cannot read
        raise ConfigError(f"model.hf: {cfg.hf} cannot be read ({_first_line(err)})") from None
    kind = getattr(config, "model_type", "")
    if kind not in ARCHITECTURES or kind not in ATTENTION:
        raise ConfigError(f"model.hf: model type {kind or 'unknown'!r} of {cfg.hf} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    return config, folder, revision


def load_pretrained(cfg: ModelConfig, context: int, vocab_size: int, meta: bool = False) -> "PretrainedLM":
    """`model.hf` with its PEER layers; `vocab_size` is the stream tokenizer's, `context` the block
    length. `meta`: shapes only (the config's architecture with meta tensors, no weights read)."""
    transformers = _transformers()
    config, folder, revision = load_config(cfg)
    model_vocab = int(config.vocab_size)
    if vocab_size > model_vocab:
        raise ConfigError(f"model.hf: the stream's tokenizer has {vocab_size:,} tokens but {cfg.hf} has "
                          f"{model_vocab:,} embeddings")
    positions = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, key, None), int)), None)
    if positions is not None and context > positions:
        raise ConfigError(f"stream.block_len ({context}) exceeds the {positions} positions of {cfg.hf}")
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # its load report and progress bars are not ours to print
    transformers.logging.disable_progress_bar()
    try:
        if meta:
            with torch.device("meta"):
                hf = transformers.AutoModelForCausalLM.from_config(
                    config, trust_remote_code=cfg.hf_trust_remote_code, dtype=torch.float32)
        else:
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                folder, config=config, local_files_only=True, trust_remote_code=cfg.hf_trust_remote_code,
                dtype=torch.float32)
    except Exception as err:  # missing, truncated or mismatched weights: whatever the format's reader raises
        raise ConfigError(f"model.hf: the weights of {cfg.hf} cannot be loaded ({_first_line(err)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    source = {"hf": cfg.hf, "revision": revision, "model_type": config.model_type}
    return PretrainedLM(hf, cfg, context, source)


def _peer_of(ffn: nn.Module) -> PEER | None:
    """The PEER layer of a block's feed-forward module (itself, or beside the MLP), None for an MLP."""
    return ffn if isinstance(ffn, PEER) else ffn.peer if isinstance(ffn, ParallelPEER) else None


class PretrainedLM(nn.Module):
    """A Hugging Face causal LM with PEER layers: `logits = model(input_ids)`, [B, T] -> [B, T, vocab].

    The blocks named by `cfg.ffn_layers` get PEER (`cfg.ffn` "peer") inserted as `cfg.hf_insert`
    says; `cfg.ffn` "dense" keeps the pretrained model as it is (the baseline of continued training).
    """

    def __init__(self, hf: nn.Module, cfg: ModelConfig, context: int, source: dict):
        super().__init__()
        self.hf, self.cfg, self.context, self.source = hf, cfg, context, source
        self.vocab_size = int(hf.config.vocab_size)
        self.dim = hidden_size(hf)
        config = hf.config
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
        # the queries' width, which scores and mixing run over: heads x head_dim (Qwen3's is not dim)
        self.attention_width = heads * (getattr(config, "head_dim", None) or self.dim // heads)
        layers, self._mlp_attr = blocks_of(hf)
        self._attn_attr = ATTENTION[source["model_type"]]
        self._blocks_prefix = next(name for name, module in self.named_modules() if module is layers)
        self.special = cfg.special_layers(len(layers))
        if cfg.ffn == "peer":
            p = cfg.peer
            try:
                retrofit(hf, blocks=self.special, mode=cfg.hf_insert, num_experts=p.num_experts, heads=p.heads,
                         top_k=p.top_k, key_dim=p.key_dim, activation=p.activation, query_norm=p.query_norm,
                         score=p.score)
            except ValueError as err:
                raise ConfigError(f"model: {err}") from None

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (what FSDP shards one by one)."""
        return blocks_of(self.hf)[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.context:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the model's context of {self.context}")
        return self.hf(input_ids=input_ids, use_cache=False).logits

    # -- what the harness needs to know about the FFNs ---------------------

    def ffns(self) -> list[nn.Module]:
        """Each block's feed-forward module: the pretrained MLP, a PEER layer or ParallelPEER."""
        return [getattr(block, self._mlp_attr) for block in self.blocks]

    def _ffn_kind(self, ffn: nn.Module) -> str:
        return "peer" if isinstance(ffn, PEER) else "mlp+peer" if isinstance(ffn, ParallelPEER) else "mlp"

    def expert_layers(self) -> dict[str, nn.Module]:
        """The PEER layers by name, e.g. {"hf.transformer.h.1.mlp.peer": PEER(...)}."""
        return {name: module for name, module in self.named_modules() if isinstance(module, PEER)}

    def expert_inputs(self, blocks_BT: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each PEER layer's input [tokens, dim] when the model, in eval mode, reads `blocks_BT`."""
        return capture_expert_inputs(self, blocks_BT)

    def num_experts(self) -> int:
        return sum(layer.num_experts for layer in self.expert_layers().values())

    def aux_loss(self) -> torch.Tensor:
        """PEER layers have no auxiliary loss; the sum is kept for the harness's one interface."""
        device = next(self.parameters()).device
        return sum((layer.aux_loss() for layer in self.expert_layers().values()), torch.zeros((), device=device))

    # -- sizes and compute ----------------------------------------------------

    @staticmethod
    def _matrix_flops(module: nn.Module) -> int:
        """2 FLOPs per weight of every matrix (nn.Linear and GPT-2's Conv1D alike) in `module`; LoRA
        adapters are counted once, on their own line of flops_per_token."""
        return sum(2 * p.numel() for name, p in module.named_parameters() if p.dim() == 2 and not is_adapter(name))

    def _ffn_flops(self, ffn: nn.Module, convention: str) -> int:
        peer = _peer_of(ffn)
        own = 0
        if peer is not None:
            own = peer.matmul_flops_per_token() if convention == "matmul" else peer.flops_per_token()
        mlp = ffn.mlp if isinstance(ffn, ParallelPEER) else None if isinstance(ffn, PEER) else ffn
        return own + (self._matrix_flops(mlp) if mlp is not None else 0)

    def flops_per_token(self, convention: Literal["all", "matmul"] = "all") -> dict[str, int]:
        """Forward FLOPs per token by component, as LanguageModel counts them: every block's attention
        (its matrices, and scores and mixing over on average context/2 keys at heads x head_dim), its
        MLP's matrices, the PEER layers' count in the chosen convention and the LM head. The pretrained
        parts count their matrix products in both conventions (norms and activations are left out)."""
        out = {}
        for i, block in enumerate(self.blocks):
            attention = getattr(block, self._attn_attr)
            out[f"blocks.{i}.attn"] = self._matrix_flops(attention) + 2 * 2 * self.attention_width * (self.context // 2)
            ffn = getattr(block, self._mlp_attr)
            out[f"blocks.{i}.ffn ({self._ffn_kind(ffn)})"] = self._ffn_flops(ffn, convention)
        out["head"] = 2 * self.dim * self.vocab_size
        adapters = sum(2 * p.numel() for name, p in self.named_parameters() if is_adapter(name))
        if adapters:
            out["adapters (LoRA)"] = adapters
        return out

    def ffn_breakdowns(self) -> dict[str, dict[str, int]]:
        """The PEER layers' forward FLOPs per token by stage (with the pretrained MLP beside it)."""
        out = {}
        for i, ffn in enumerate(self.ffns()):
            peer = _peer_of(ffn)
            if peer is not None:
                mlp = {"pretrained MLP": self._matrix_flops(ffn.mlp)} if isinstance(ffn, ParallelPEER) else {}
                out[f"blocks.{i}.ffn ({self._ffn_kind(ffn)})"] = {**mlp, **peer.flops_breakdown()}
        return out

    def param_counts(self) -> dict[str, int]:
        """Total parameters and parameters touched per token (a tied head counted once): of an
        embedding table read only by lookup (untied input embeddings, GPT-2's positions) one row."""
        total = sum(p.numel() for p in self.parameters())
        ffn_total = ffn_active = 0
        for ffn in self.ffns():
            peer = _peer_of(ffn)
            size = sum(p.numel() for p in ffn.parameters())
            ffn_total += size
            ffn_active += size if peer is None else size - peer.num_params() + peer.active_params_per_token()
        head = self.hf.get_output_embeddings()
        head_weight = head.weight if head is not None else None
        lookups = [m.weight for m in self.hf.modules()
                   if isinstance(m, nn.Embedding) and m.weight is not head_weight]
        active = total - ffn_total + ffn_active - sum(w.numel() - w.shape[1] for w in lookups)
        return {"total": total, "active_per_token": active, "ffn_total": ffn_total, "ffn_active": ffn_active}

    # -- parameter groups and the pretrained weights ---------------------------

    def parameter_owner(self, name: str) -> tuple[str, str]:
        """(kind of the part holding parameter `name`, the name's first part inside a PEER layer): kind
        is "peer", "dense" (a block's pretrained MLP), "attention", "norms", "embeddings" or "other"."""
        for layer_name in self.expert_layers():
            if name.startswith(layer_name + "."):
                return "peer", name[len(layer_name) + 1:].split(".")[0]
        module_name = name.rsplit(".", 1)[0]
        module = self.get_submodule(module_name)
        head = self.hf.get_output_embeddings()
        if isinstance(module, nn.Embedding) or module is head:
            return "embeddings", ""
        if type(module).__name__.endswith("Norm") or isinstance(module, nn.LayerNorm):
            return "norms", ""
        if name.startswith(self._blocks_prefix + "."):  # <blocks>.<i>.<attention or MLP>.<...>
            part = name[len(self._blocks_prefix) + 1:].split(".")[1]
            return {self._attn_attr: "attention", self._mlp_attr: "dense"}.get(part, "other"), ""
        return "other", ""

    def base_names(self) -> list[str]:
        """Names (state dict keys) of the pretrained weights: everything but PEER layers and adapters."""
        peers = [name + "." for name in self.expert_layers()]
        return [k for k in self.state_dict() if not is_adapter(k) and not any(k.startswith(p) for p in peers)]

    def base_digest(self) -> str:
        """SHA-256 over the pretrained weights' names, dtypes, shapes and bytes (what a checkpoint that
        references them instead of copying them checks on load)."""
        digest = hashlib.sha256()
        state = self.state_dict()
        for key in sorted(self.base_names()):
            tensor = state[key].detach().to("cpu").contiguous()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()
