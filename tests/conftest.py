"""Shared fixtures: a small byte-level BPE tokenizer and small random Llama models."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmgen_fast.models import LlamaConfig, LlamaForPretraining

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before any
# kernel is defined; setting it here, first, keeps the order of test imports irrelevant.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def skip_nested_interpreter_patching() -> bool:
    """Make Triton's interpreter patch ``triton.language`` once per launch, not again at
    every call of a ``@triton.jit`` helper inside the kernel; returns whether it did.

    Each launch patches the language's builtins for its run and restores them after; each
    helper call patches them again (``inspect.getmembers`` over the language, about 2 ms),
    finds them already patched, and keeps no scope to restore, so it changes nothing: about
    half of an interpreted launch's time here (7.6 of 15.3 s in one kernel test). A helper
    whose module sees a language module not patched yet (``tl.sum`` sees ``tl.core``) is
    patched as before, once; Triton never restores a helper's patches either.
    ``LMGEN_PLAIN_INTERPRETER=1`` turns this off.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("LMGEN_PLAIN_INTERPRETER"):
        return False
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    real, scope_cls = getattr(ti, "_patch_lang", None), getattr(ti, "_LangPatchScope", None)
    if real is None or scope_cls is None or getattr(real, "lmgen_wrapped", False):
        return False
    launch: list[set[int]] = []  # the language modules the running launch patched

    def langs(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if v is ti.tl or v is ti.tl.core}

    def patch_lang(fn):
        if launch and langs(fn) <= launch[0]:
            return scope_cls()  # a helper call inside the launch: already patched
        scope = real(fn)
        if launch:  # a helper that sees more (tl.sum sees tl.core): patched now, for good
            launch[0] |= langs(fn)
        else:  # the launch itself (GridExecutor): forget it when it restores
            launch.append(langs(fn))
            restore = scope.restore

            def restore_and_forget() -> None:
                launch.clear()
                restore()

            scope.restore = restore_and_forget
        return scope

    patch_lang.lmgen_wrapped = True
    ti._patch_lang = patch_lang
    return True


# Where the kernel tests run: CUDA, or the interpreter on CPU tensors.
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
FAST_INTERPRETER = skip_nested_interpreter_patching()
# The `gpu` marker; the collection hook below skips its tests unless CUDA runs them.
gpu = pytest.mark.gpu


@pytest.fixture(params=[pytest.param("cpu", id="interpreter", marks=pytest.mark.interpreter),
                        pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)])
def kernel_device(request: pytest.FixtureRequest) -> str:
    """Where a kernel test runs: each such test is a pair, ``[gpu]`` (compiled kernels on
    CUDA, what ``benchmarks/device_check.sh`` runs with ``-m gpu``) and its twin
    ``[interpreter]`` (the same body on CPU tensors under ``TRITON_INTERPRET=1``, what CI
    runs). A process has one or the other: Triton picks the interpreter when a kernel is
    defined, so the twin skips where the kernels are compiled."""
    if request.param == "cpu" and not INTERPRETED:
        pytest.skip("the interpreter twin runs where TRITON_INTERPRET=1 (the CPU machines)")
    return request.param

# time_limit: with LMGEN_UNMARKED_LIMIT set (CI), an unmarked test over the limit fails the
# run; pytester: tests/test_markers.py runs that plugin on generated test files.
pytest_plugins = ["time_limit", "pytester"]

TESTS = Path(__file__).resolve().parent

# Every speed marker of the suite, in one place: (test file under tests/, test name, markers),
# both fnmatch patterns; a test name includes its parameters ("test_x[triton]"). `make quick`
# leaves out slow, interpreter, statistical, subprocess and aot; gpu tests skip without CUDA.
# slow: over ~1.5 s on the 2-core CPU machine (CI fails an unmarked test over 3 s, so the
# margin absorbs a loaded machine); interpreter: runs Triton kernels under TRITON_INTERPRET;
# statistical: frequency (chi-square, binomial) tests over many draws; subprocess: starts
# python processes (each imports torch again); aot: the ahead-of-time kernel compile.
MARKS: list[tuple[str, str, tuple[str, ...]]] = [
    # Whole files whose every test launches Triton kernels in the interpreter.
    ("sampling/test_kernel.py", "*", ("interpreter",)),
    ("sampling/test_kernel_extensions.py", "*", ("interpreter",)),
    ("sampling/test_kernel_masks.py", "*", ("interpreter",)),
    ("sampling/test_kernel_masks.py", "test_kernel_matches_reference_under_*", ("slow",)),
    ("sampling/test_kernel_masks.py", "test_kernel_raises_*", ("slow",)),
    ("engine/test_engine_masks.py", "*[[]triton[]]", ("interpreter", "slow")),
    ("models/test_decode_kernels.py", "*", ("interpreter",)),
    ("models/test_fused_step.py", "*", ("interpreter",)),
    ("models/test_families.py", "*[[]interpreter*", ("interpreter", "slow")),
    ("models/test_families.py", "*[[]llama3[]]", ("slow",)),
    # The first import of a transformers model module (seconds) may land here.
    ("api/test_tokenization.py", "test_a_tokenizer_without_bos_*", ("slow",)),
    ("models/test_fused_mlp.py", "test_matches_eager_*[[]interpreter-*-64-*", ("slow",)),
    ("models/test_decode_attention.py", "*", ("interpreter",)),
    ("engine/test_bookkeeping.py", "*", ("interpreter",)),
    ("api/test_requests.py", "test_n_samples_are_the_seeded_single_runs_*", ("slow",)),
    ("api/test_stops.py", "test_the_kernels_end_rows_*", ("interpreter", "slow")),
    ("sampling/test_sampler_setup.py", "*", ("interpreter",)),
    ("benchmarks/test_bench_launches.py", "*", ("interpreter",)),
    ("cli/test_kernel_compile.py", "*", ("aot",)),
    ("cli/test_kernel_compile.py", "test_every_code_path_compiles_for_each_arch", ("subprocess",)),
    ("cli/test_kernel_compile.py", "test_spills_within_budget*", ("subprocess",)),
    ("cli/test_kernel_compile.py", "test_compile_time_per_variant", ("subprocess",)),
    ("sampling/test_chunk_occupancy.py", "*", ("aot", "subprocess", "slow")),
    ("sampling/test_sampler_setup.py", "test_long_crowded_windows_*", ("slow",)),
    # The Triton backend of engine-level tests (test_capture_safety stubs the kernels out).
    ("engine/test_engine.py", "*[[]triton[]]", ("interpreter",)),
    ("engine/test_slots.py", "*[[]triton[]]", ("interpreter",)),
    ("sampling/test_sampling_extensions.py", "*[[]triton[]]", ("interpreter",)),
    ("engine/test_engine.py", "test_replayed_steps_give_the_eager_*", ("interpreter", "slow")),
    ("engine/test_engine.py", "test_graphs_of_*_are_never_replayed", ("interpreter", "slow")),
    ("engine/test_fallback.py", "test_a_failed_capture_runs_the_decoder_eagerly",
     ("interpreter", "slow")),
    ("engine/test_fallback.py", "test_engine_runs_the_reference_when_the_kernels_fail",
     ("interpreter",)),
    ("engine/test_fallback.py", "test_sample_falls_back_to_the_reference_with_one_warning",
     ("interpreter",)),
    ("engine/test_fallback.py", "test_bad_arguments_are_not_mistaken_for_a_kernel_failure",
     ("interpreter",)),
    ("engine/test_slots.py", "test_slots_keep_the_step_shape_and_replay_its_graphs",
     ("interpreter", "slow")),
    ("engine/test_engine.py", "test_graph_replay_gives_the_eager_tokens_across_kv_buckets*",
     ("slow",)),
    ("engine/test_engine.py", "test_graphs_for_article_and_transformers_modules*", ("slow",)),
    ("engine/test_engine.py", "test_batch_with_streaming*", ("slow",)),
    ("engine/test_grammar.py", "test_grammar_rows_parse_through_slots_*", ("slow",)),
    ("api/test_score.py", "test_scores_match_transformers*", ("slow",)),
    ("integrations/test_lm_eval.py", "*", ("slow",)),
    # Frequency tests.
    ("*", "*chi_square*", ("statistical",)),
    ("*", "test_unseeded_rows*_draw*_the_exact_distribution*", ("statistical",)),
    ("engine/test_engine.py", "test_unseeded_rows_draw_from_the_exact_distribution",
     ("interpreter", "slow")),
    ("sampling/test_reference.py", "test_pos_inf_share_probability_equally", ("statistical",)),
    # Child processes.
    ("core/test_philox.py", "test_matches_triton_philox_under_interpreter",
     ("subprocess", "interpreter")),
    ("sampling/test_kernel.py", "test_cpu_without_interpreter_says_how_to_enable",
     ("subprocess",)),
    ("models/test_hf.py", "test_cli_generates_from_a_transformers_checkpoint", ("subprocess",)),
    ("models/test_hf.py", "test_import_does_not_import_transformers", ("subprocess",)),
    ("jobs/test_jobs.py", "test_killed_run_resumes_to_the_uninterrupted_result", ("subprocess",)),
    ("jobs/test_jobs.py", "test_two_ranks_under_torchrun_match_one_process", ("subprocess",)),
    ("cli/test_cli.py", "test_command_line_gives_the_python_call_text", ("subprocess",)),
    ("cli/test_cli.py", "test_process_error_is_one_line_without_traceback", ("subprocess",)),
    ("cli/test_cli.py", "test_prompt_that_is_not_utf8_is_a_usage_error", ("subprocess",)),
    ("benchmarks/test_bench_decode.py", "*", ("subprocess",)),
    ("benchmarks/test_bench_jobs.py", "*", ("subprocess",)),
    ("benchmarks/test_bench_hf.py", "*", ("subprocess",)),
    ("benchmarks/test_bench_score.py", "*", ("subprocess",)),
    ("benchmarks/test_device_check.py", "*", ("subprocess",)),  # bash with a stub python
    ("test_markers.py", "test_every_gpu_test_has_an_interpreter_twin", ("subprocess", "slow")),
    ("test_imports.py", "test_plain_import_leaves_the_optional_extras_alone", ("subprocess",)),
    ("test_imports.py", "test_no_command_imports_matplotlib_until_it_draws", ("subprocess",)),
    ("test_imports.py", "test_a_bare_kernels_import_from_the_checkout_is_never_these_sources",
     ("subprocess",)),
    # Slow in-process tests (baseline call times on the 2-core machine).
    ("benchmarks/test_results_render.py", "test_renders_what_the_scripts_write_on_the_cpu",
     ("slow", "interpreter")),  # bench_sampler's smoke runs launch the sampler kernels
    ("models/test_models.py", "test_cached_prefill_and_decode_equal_full_recompute", ("slow",)),
    ("models/test_models.py", "test_loads_article_state_dict_strictly_and_matches_its_forward",
     ("slow",)),
    ("api/test_default_model.py", "test_held_out_loss_is_far_below_the_unigram_loss", ("slow",)),
    ("speculative/test_speculative.py", "test_draft_model_matches_plain_decoding*", ("slow",)),
    ("speculative/test_speculative.py", "test_ngram_matches_plain_decoding", ("slow",)),
    ("speculative/test_speculative.py", "test_cli_generate_and_run_take_speculative_options",
     ("slow",)),
    ("speculative/test_speculative.py", "test_the_captured_verify_step_never_waits_*",
     ("slow",)),
    ("speculative/test_speculative_kernels.py", "*[[]interpreter[]]", ("interpreter", "slow")),
    ("speculative/test_speculative_kernels.py", "test_a_kernel_failure_falls_back_*",
     ("interpreter",)),
    ("speculative/test_speculative_slots.py",
     "test_slots_give_plain_and_static_tokens[[]*draft_model[]]", ("slow",)),
    ("speculative/test_speculative_slots.py", "*[[]interpreter[]]", ("interpreter", "slow")),
    ("jobs/test_speculative_jobs.py", "*", ("slow",)),
    ("sampling/test_sampling_extensions.py", "test_generate_batch_details_carry_logprobs",
     ("slow",)),
    ("sampling/test_sampling_extensions.py", "test_command_line_options_reach_the_sampler",
     ("slow",)),
    ("sampling/test_sampling_extensions.py", "test_generate_batch_processed_logprobs*",
     ("slow",)),
    ("sampling/test_reference_device.py", "test_unseeded_batch_of_one_on_the_device_path_races",
     ("slow",)),
    ("jobs/test_jobs.py", "test_run_few_dozen", ("slow",)),
    ("jobs/test_jobs.py", "test_seeded_rows_do_not_depend_on_batch_size", ("slow",)),
    ("engine/test_slots.py", "test_slots_utilization_beats_static_batches_on_mixed_lengths",
     ("slow",)),
    ("core/test_philox.py", "test_uniform_range_and_mean", ("slow",)),
    ("cli/test_plots.py", "test_bench_plot_end_to_end", ("slow",)),
    ("benchmarks/test_render_plot.py", "test_plot_draws_each_file_with_its_roofline", ("slow",)),
]


def marks_of(relpath: str, name: str) -> set[str]:
    """The markers :data:`MARKS` gives the test ``name`` of ``relpath`` (under tests/)."""
    return {m for file, pattern, marks in MARKS
            if fnmatchcase(relpath, file) and fnmatchcase(name, pattern) for m in marks}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        try:
            rel = item.path.relative_to(TESTS).as_posix()
        except ValueError:  # a test outside tests/ (pytester's)
            continue
        for name in sorted(marks_of(rel, item.name)):
            item.add_marker(name)
        if item.get_closest_marker("gpu") and (not CUDA or INTERPRETED):
            item.add_marker(skip_gpu)


def require_kernel_runtime() -> None:
    """Skip the calling test module unless triton is installed and can run here."""
    pytest.importorskip("triton")
    if not CUDA and not INTERPRETED:
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


class StandInGraph:
    """Base of the CPU stand-ins for :class:`lmgen_fast.runtime.graphs.CudaGraph`: the
    caller hands it a :class:`~lmgen_fast.runtime.graphs.GraphPool`, warms a step up by
    running it, then captures and replays; subclasses say what capture and replay do."""

    def __init__(self, pool):
        pass

    @staticmethod
    def warm(fn):
        fn()


class ReplayedGraph(StandInGraph):
    """A CPU stand-in for a CUDA graph: capture keeps the step, replay runs it again, so a
    step that read anything but its buffers would give other tokens. Counts captures and
    replays (reset them before use)."""

    captures = replays = 0

    def capture(self, fn):
        self.fn = fn
        ReplayedGraph.captures += 1

    def replay(self):
        ReplayedGraph.replays += 1
        self.fn()


class FakeCompilationError(Exception):
    """Stands for triton.compiler.errors.CompilationError and its relatives."""


@pytest.fixture
def broken_kernels(monkeypatch):
    """Every launch of the Triton sampler fails the way a Triton compilation failure does;
    the list holds one entry per attempt. The process-wide failure record is reset before
    and after."""
    from lmgen_fast.runtime import reset_failure
    from lmgen_fast.sampling import kernel as kernel_sampler

    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise FakeCompilationError("at 12:4: unsupported op on this target")

    reset_failure()
    monkeypatch.setattr(kernel_sampler, "launch", fail)
    yield calls
    reset_failure()


def capture(device: str, fn):
    """A replay function for ``fn``: on "cuda" ``fn`` is warmed up once (compiling stays out
    of the capture), captured as a CUDA graph, and each call replays it and returns the
    captured outputs; on the CPU (the interpreter twins) each call runs ``fn`` again, on
    the same buffers."""
    if device != "cuda":
        return fn
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def at_size(device: str, full: tuple, small: tuple) -> tuple:
    """``full`` on a GPU, ``small`` for the interpreter twin of the same test."""
    return full if device == "cuda" else small


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the ones before it.",
    "Sampling with temperature, top-k and a repetition penalty shapes the output.",
    "def generate(model, tokenizer, prompt): return text",
    "Once upon a time there was a small model that wrote short stories.",
] * 20


def make_tokenizer(specials=("[UNK]", "[BOT]", "[EOT]", "[PAD]"), vocab_size=400) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_for_the_session():
    """Every test runs on one torch thread.

    Tiny models decode fastest on one thread, and on a machine whose cores are busy, two
    threads mostly wait for each other (seen here: 10 to 40 times slower; the cached-decode
    test of tests/models/test_models.py took 7.0 s on two threads, 4.1 s on one).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (the session fixture above already does;
    kept for the modules that ask for it by name)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def write_checkpoint(directory):
    """Save a tiny random model and its tokenizer in the layout ``--model DIR`` reads;
    return ``(model, tokenizer)``."""
    import json

    from safetensors.torch import save_file

    tokenizer = make_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    model = random_model(tokenizer.get_vocab_size(), seed=0, scale=8.0)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    return model, tokenizer

@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return make_tokenizer()


def small_config(vocab_size: int, **overrides) -> LlamaConfig:
    base = dict(
        vocab_size=vocab_size, max_position_embeddings=256, hidden_size=64,
        intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def random_model(vocab_size: int, seed: int = 0, scale: float = 1.0, **overrides):
    """A random LlamaForPretraining; ``scale`` sharpens the output distribution."""
    torch.manual_seed(seed)
    model = LlamaForPretraining(small_config(vocab_size, **overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model.eval()


@pytest.fixture(scope="session")
def model(tokenizer) -> LlamaForPretraining:
    return random_model(tokenizer.get_vocab_size(), seed=0, scale=8.0)


def assert_frequencies_match(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Drawn ``tokens`` never leave the support of ``probs`` (float64 ``[V]``) and pass a
    chi-square test against it (p-value above 1e-3; fixed seeds keep it deterministic)."""
    observed = torch.bincount(tokens, minlength=probs.numel()).to(torch.float64)
    support = probs > 0
    assert observed[~support].sum() == 0, "drew a token outside the support"
    _, pvalue = stats.chisquare(observed[support], probs[support] * tokens.numel())
    assert pvalue > 1e-3, pvalue


def exact_processed(logits: torch.Tensor, p, window: list[int] | None, token: int) -> torch.Tensor:
    """The processed log-probabilities of one row in float64, written from the contract
    (docs/semantics.md sections 2 and 3) without the library's code: float64 ``[V]``.

    ``logits`` ``[V]``; ``p`` a SamplingParams; ``window`` the row's penalty window (``-1``
    for empty slots); ``token`` the drawn token (a greedy row is a point mass on it).
    """
    z = logits.to(torch.float64).clone()
    z[torch.isnan(z)] = -math.inf
    vocab = z.numel()
    greedy = p.temperature == 0
    t = 1.0 if greedy else p.temperature
    z = z / t
    counts: dict[int, int] = {}
    for w in window or []:
        if w >= 0:
            counts[w] = counts.get(w, 0) + 1
    for w, c in counts.items():
        reps = 1 if p.penalty_mode == "once" else c
        factor = p.repetition_penalty ** reps
        z[w] = z[w] / factor if z[w] > 0 else z[w] * factor
        z[w] = z[w] - (p.frequency_penalty * c + p.presence_penalty) / t
    out = torch.full((vocab,), -math.inf, dtype=torch.float64)
    if greedy:
        out[token] = 0.0
        return out
    if 0 < p.top_k < vocab:
        tau = torch.sort(z, descending=True).values[p.top_k - 1]
        z[z < tau] = -math.inf
    inf = z == math.inf
    if inf.any():
        out[inf] = -math.log(int(inf.sum()))
        return out
    if p.top_p < 1:
        q = torch.softmax(z, dim=0)
        above = torch.stack([q[z > v].sum() for v in z])
        z[above >= p.top_p] = -math.inf
    if p.min_p > 0:
        z[torch.exp(z - z.max()) < p.min_p] = -math.inf
    return torch.log_softmax(z, dim=0)


def assert_processed_close(got_token: torch.Tensor, got_ids: torch.Tensor,
                           got_vals: torch.Tensor, logits: torch.Tensor, rows, window,
                           tokens: torch.Tensor, atol: float = 1e-5) -> None:
    """A sample's processed log-probabilities (token ``[B]``, top ids and values ``[B, n]``)
    against :func:`exact_processed`: the same survivors listed in the same order (equal
    values lower id first), each value within ``atol``, and when every survivor is listed,
    their probabilities sum to 1 within ``atol``."""
    for r, p in enumerate(rows):
        win = None if window is None else window[r].tolist()
        want = exact_processed(logits[r].cpu(), p, win, int(tokens[r]))
        tok = int(tokens[r])
        assert want[tok] > -math.inf, f"row {r}: token {tok} was removed"
        assert abs(float(got_token[r]) - float(want[tok])) <= atol, (r, got_token[r], want[tok])
        n = got_ids.shape[1]
        survivors = int((want > -math.inf).sum())
        order = sorted(range(want.numel()), key=lambda i: (-float(want[i]), i))[:min(n, survivors)]
        ids = got_ids[r].tolist()
        listed = [i for i in ids if i >= 0]
        assert len(listed) == min(n, survivors), (r, ids, survivors)
        assert all(i == -1 for i in ids[len(listed):])
        # Ranks may swap only between values equal within atol.
        for a, b in zip(listed, order, strict=True):
            assert a == b or abs(float(want[a]) - float(want[b])) <= atol, (r, listed, order)
        vals = got_vals[r, :len(listed)].double().cpu()
        assert torch.allclose(vals, want[listed], atol=atol, rtol=0), (r, vals, want[listed])
        assert (got_vals[r, len(listed):] == -math.inf).all()
        if survivors <= n:
            assert abs(float(torch.exp(vals).sum()) - 1.0) <= atol


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``benchmarks/SCRIPT ARGS`` in a fresh interpreter (a smoke run); it must exit 0."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


# A minimal chat template (role tags, then the assistant's tag as the generation prompt), for
# the tests of chat prompts and of the harness's --apply_chat_template.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
