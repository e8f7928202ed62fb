"""Property-based fuzzing of the command line: whatever the user gives, a run either completes or
ends with exit status 2 and one line naming the problem -- never a traceback."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong import cli

TINY = ["--set", "model.dim=16", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
        "--set", "model.peer.num_experts=16", "--set", "model.peer.heads=1", "--set", "model.peer.top_k=2",
        "--set", "model.peer.key_dim=8", "--set", "eval.curve_every=0"]

KEYS = ["seed", "stream.block_len", "stream.train_tokens", "stream.test_tokens", "stream.test_fraction",
        "stream.order", "model.dim", "model.n_heads", "model.ffn", "model.ffn_layers", "model.peer.num_experts",
        "model.peer.top_k", "model.peer.key_dim", "model.peer.query_norm", "model.moe.top_k",
        "model.moe.num_experts", "train.batch_size", "train.grad_accum", "train.lr", "train.epochs",
        "train.precision", "strategy.name", "growth.schedule", "growth.experts", "growth.freeze",
        "checkpoint.keep", "nope.key", "train", "model.peer"]

values = st.one_of(
    st.integers(min_value=-3, max_value=300).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(str),
    st.sampled_from(["true", "null", "[]", "{}", "[1, 2]", "peer", "moe", "dense", "middle", "all", "0,0",
                     "boundary", "existing", "replay", "joint", "bf16", "shuffle", "''", "{a: 1}"]),
    st.text(alphabet=string.ascii_letters + string.digits + " ,.-_:[]{}", max_size=12),
)


def _check(code, err):
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("lifelong: error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=3))
def test_any_config_value_validates_or_is_refused(overrides, capsys):
    argv = ["flops", "--preset", "smoke"]
    for key, value in overrides:
        argv += ["--set", f"{key}={value}"]
    code = cli.main(argv)
    _check(code, capsys.readouterr().err.strip())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(block_len=st.integers(1, 40), train_tokens=st.integers(1, 600), test_tokens=st.integers(1, 200),
       batch_size=st.integers(1, 6), strategy=st.sampled_from(["naive", "replay", "distill", "cumulative"]))
def test_tiny_runs_complete_or_are_refused(block_len, train_tokens, test_tokens, batch_size, strategy,
                                           tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("fuzz")
    argv = ["run", "--preset", "smoke", "--out", str(out / "r"), "--no-progress", *TINY,
            "--set", f"stream.block_len={block_len}", "--set", f"stream.train_tokens={train_tokens}",
            "--set", f"stream.test_tokens={test_tokens}", "--set", f"train.batch_size={batch_size}",
            "--set", f"strategy.name={strategy}", "--set", "strategy.replay.buffer_tokens=4096"]
    code = cli.main(argv)
    _check(code, capsys.readouterr().err.strip())
    if code == 0:
        assert (out / "r" / "results.json").is_file()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=4))
def test_random_bytes_as_a_text_domain(docs, tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("bytes")
    folder = root / "noise"
    folder.mkdir()
    for i, data in enumerate(docs):
        (folder / f"doc{i}.txt").write_bytes(data)
    argv = ["run", "--preset", "smoke", "--out", str(root / "r"), "--no-progress", *TINY,
            "--set", "stream.block_len=16", "--set", "stream.train_tokens=512", "--set", "stream.test_tokens=128",
            "--set", f"stream.domains=[{{name: noise, path: '{folder}'}}]", "--set", "stream.cache_dir=null"]
    code = cli.main(argv)
    _check(code, capsys.readouterr().err.strip())
