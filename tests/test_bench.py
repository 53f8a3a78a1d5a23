"""bench.py end to end on a very small model, on a fixed clock: a row per stage, each row's figures
by hand; and MFU's two parts, the peak measurement and the FLOP formula (against torch's own FLOP
counter). Not a timing test: real times depend on the machine and its load."""
import ast
import itertools
import math
import statistics

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, GPTConfig
from scripts import ROOT, function_defs, run_python

ROWS = ['sft', 'rm', 'dpo', 'dpo_ref_precomputed', 'ppo_rollout_no_kv_cache', 'ppo_rollout_hf_generate',
        'ppo_rollout', 'ppo_score',
        'ppo_update_1x1', 'ppo_iteration_1x1', 'ppo_update_4x1', 'ppo_iteration_4x1',
        'ppo_update_4x2', 'ppo_iteration_4x2']


# bench.py run with a fixed clock: each call of its clock() from bench.py advances exactly 0.5 s (everything else keeps
# the real clock), so every timed phase takes 0.5 s and each row's figures are known in closed form
FIXED_CLOCK = """
import runpy, sys, time
script, real, now = sys.argv[1], time.perf_counter, [0.0]
def fake():
    if sys._getframe(1).f_code.co_filename.endswith('bench.py'):
        now[0] += 0.5
        return now[0]
    return real()
time.perf_counter = fake
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
"""


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_bench_rows_by_hand_on_a_fixed_clock(dtype):
    # a row per stage; s/step the median of the timed steps (one here, after a warmup step; run() is tested below), a
    # PPO iteration the sum of its three phases; tokens/s = tokens / s/step; MFU = 100 x the FLOPs of the passes the
    # row's step runs / s/step / peak, with bench.flops (checked against torch's FLOP counter below). A peak of 1e4
    # FLOP/s: MFU printed to 2 decimals then resolves a FLOP count to about 1e-8 of it. float32 runs the static-shape
    # rollout and checkpointed training (model tests cover the defaults); bfloat16 recomputes pi_old in the scoring
    # pass (its sampling log-probs are not exact)
    L, H, D, V, B, P, R = 1, 2, 32, 512, 4, 8, 8
    T, peak = P + R, 1e4
    stages, options = ('sft,rm,dpo,ppo', ['--decode=static', '--grad_checkpoint=True']) if dtype == 'float32' else ('ppo', [])
    p = run_python(['-c', FIXED_CLOCK, str(ROOT / 'bench.py'), f'--stages={stages}', '--steps=1', '--warmup=1',
                    f'--n_layer={L}', f'--n_head={H}', f'--n_embd={D}', f'--vocab_size={V}', f'--batch_size={B}',
                    f'--prompt_len={P}', f'--response_len={R}', '--threads=1', f'--dtype={dtype}', '--device=cpu',
                    f'--peak_flops={peak}', *options], env={'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    first = next(line for line in lines if line.startswith('bench:'))
    want_first = 'bench: preset tiny, cpu, 1 threads, ' + ('float32, grad checkpointing;' if dtype == 'float32' else 'bfloat16;')
    assert first.startswith(want_first + ' GPT 1L/2H/32d'), first
    assert 'peak for MFU: 0.0 GFLOP/s (given)' in lines, p.stdout
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ['stage', 's/step'])
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1:] if line.strip()}
    assert list(rows) == (ROWS if dtype == 'float32' else [r for r in ROWS if r.startswith('ppo')]), p.stdout

    lm = GPT(GPTConfig(n_layer=L, n_head=H, n_embd=D, block_size=T, vocab_size=V))
    scalar = GPT(GPTConfig(n_layer=L, n_head=H, n_embd=D, block_size=T, vocab_size=V, scalar_head=True))
    (flops,) = function_defs('bench.py', 'flops')
    policy = flops(lm, B * (T - 1), T - 1, B * R)  # forward + backward, the vocabulary head at the response rows only
    reference = flops(lm, B * (T - 1), T - 1, B * R, 1)  # forward only
    gen = flops(lm, B * P, P, B, 1) + sum(flops(lm, B, P + t + 1, B, 1) for t in range(R - 1))  # prefill, R - 1 steps
    no_cache = sum(flops(lm, B * (P + t), P + t, B * (P + t), 1) for t in range(R))  # the whole sequence every step
    # scoring: the reward and value models' forwards, the reference's log-probs, and pi_old's again where not exact
    score = flops(scalar, B * T, T, 0, 1) + flops(scalar, B * (T - 1), T - 1, 0, 1) + reference * (1 if dtype == 'float32' else 2)
    epoch = policy + flops(scalar, B * (T - 1), T - 1, 0)
    want = {  # row: (s/step, tokens per step, FLOPs per step)
        'ppo_rollout_no_kv_cache': (0.5, B * T, no_cache), 'ppo_rollout_hf_generate': (0.5, B * T, gen),
        'ppo_rollout': (0.5, B * T, gen), 'ppo_score': (0.5, B * T, score),
        'ppo_update_1x1': (0.5, B * T, epoch), 'ppo_iteration_1x1': (1.5, B * T, gen + score + epoch),
        'ppo_update_4x1': (0.5, B * T, 4 * epoch), 'ppo_iteration_4x1': (1.5, B * T, gen + score + 4 * epoch),
        'ppo_update_4x2': (0.5, B * T, 4 * epoch), 'ppo_iteration_4x2': (1.5, B * T, gen + score + 4 * epoch),
        'sft': (0.5, B * T, policy), 'rm': (0.5, 2 * B * T, flops(scalar, 2 * B * T, T, 0)),
        'dpo': (0.5, 2 * B * T, 2 * policy + 2 * reference),  # the policy on 2B rows, and the reference's forward
        'dpo_ref_precomputed': (0.5, 2 * B * T, 2 * policy)}
    for name, (sec, tokens, flop) in ((name, want[name]) for name in rows):
        got_sec, got_tokens, got_tps, got_mem, got_mfu = rows[name]
        assert float(got_sec) == sec and int(got_tokens) == tokens, (name, rows[name])
        assert float(got_tps) == pytest.approx(tokens / sec, abs=0.5), (name, rows[name])
        assert math.isfinite(float(got_mem)) and float(got_mem) > 0, (name, rows[name])
        assert got_mfu.endswith('%') and float(got_mfu[:-1]) == pytest.approx(100 * flop / sec / peak, abs=0.006), \
            (name, rows[name], 100 * flop / sec / peak)


def test_run_drops_the_warmup_steps_and_times_each_phase():
    # 2 warmup steps (slow: 100 s) then 3 timed steps of two phases; the medians of the timed steps only
    marks = iter([(0, 100, 200), (0, 100, 200), (0, 1, 3), (0, 2, 7), (0, 4, 5)])
    (run,) = function_defs('bench.py', 'run', warmup=2, steps=3, statistics=statistics)
    # phase 1: 1, 2, 4 -> 2; phase 2: 2, 5, 1 -> 2; whole step: 3, 7, 5 -> 5
    assert run(lambda: next(marks)) == [2, 2, 5]


@pytest.mark.parametrize('device_name, peak', [('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 NVL', 835e12),
                                               ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H200 NVL', 835e12),
                                               ('NVIDIA H200', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                                               ('Tesla V100-SXM2-16GB', 0.0)])
def test_datasheet_peak_is_the_first_matching_part(device_name, peak):
    # the data-sheet bf16 peak MFU is quoted against on a GPU: the first part in bench.py's table named in the device's
    # name (so 'H100 PCIe' must come before 'H100'); none: no data-sheet MFU
    tree = ast.parse((ROOT / 'bench.py').read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
                and n.targets[0].id == 'DATASHEET_BF16')
    table = ast.literal_eval(node.value)
    assert next((f for part, f in table if part in device_name), 0.0) == peak


def test_measure_peak_flops_is_the_best_timed_round_after_the_warmup():
    n, reps = 64, 2
    ticks = itertools.accumulate([0.0, 0.01, 5.0, 1.0, 4.0, 0.5, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0])  # start, end of each round
    marks = iter(list(ticks))
    (measure,) = function_defs('bench.py', 'measure_peak_flops', PEAK_MATMUL=(n, reps), dtype='float32', device='cpu',
                               clock=lambda: next(marks))
    # six rounds of 0.01 (the warm-up, left out), 1.0, 0.5, 3.0, 7.0, 9.0 s (start and end marks alternate)
    assert math.isclose(measure(), 2 * n ** 3 / (0.5 / reps), rel_tol=1e-12)


def counted_flops(fn):
    """The matmul FLOPs torch counts while fn runs. Attention runs in its math kernel, whose matmuls the
    counter sees (it has no formula for the fused CPU kernel); like the PaLM formula, it counts the full
    T x T score matrix, not its causal half."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize('scalar_head', [False, True])
def test_flops_counts_the_matmuls_of_the_real_passes(scalar_head):
    # MFU's numerator, bench.flops, against torch's FLOP counter on the passes bench.py times: the SFT step
    # (the vocabulary head only at the R response positions), a reward/value model's step, the forward-only
    # passes of PPO's scoring and the KV-cache rollout. The formula counts 6 FLOPs per parameter per token
    # (2 forward), so it also counts the biases and layer norms (1-D parameters), which are no matmuls:
    # the two differ by exactly that.
    (flops,) = function_defs('bench.py', 'flops')
    torch.manual_seed(0)
    B, P, R, V = 3, 9, 7, 300
    T = P + R
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=V, scalar_head=scalar_head))
    not_matmul = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    seq = torch.randint(0, V - 1, (B, T))
    targets = seq[:, 1:].clone()
    targets[:, :P - 1] = -1  # the prompt's positions
    if scalar_head:  # train_reward_model.py: a score at every position, backward through one per row
        def step(): model(seq)[0][:, -1].sum().backward()
        assert counted_flops(step) == flops(model, B * T, T, 0) - 6 * not_matmul * B * T
        def score(): model(seq[:, :-1])[0].sum()  # the value model's pass over a rollout
        assert counted_flops(score) == flops(model, B * (T - 1), T - 1, 0, 1) - 2 * not_matmul * B * (T - 1)
        return
    def step(): model(seq[:, :-1], targets)[0].sum().backward()
    assert counted_flops(step) == flops(model, B * (T - 1), T - 1, B * R) - 6 * not_matmul * B * (T - 1)
    with torch.no_grad():
        def score(): model(seq[:, :-1], targets)  # the reference's log-probs of a rollout
        assert counted_flops(score) == flops(model, B * (T - 1), T - 1, B * R, 1) - 2 * not_matmul * B * (T - 1)
        prompts = seq[:, :P].tolist()
        def rollout(): model.generate(prompts, R, -1, 0.7)  # eos_id -1: every response is R tokens
        # bench_ppo's gen_flops: the prefill (the head at each row's last position), then R - 1 decode steps
        gen_flops = flops(model, B * P, P, B, 1) + sum(flops(model, B, P + t + 1, B, 1) for t in range(R - 1))
        assert counted_flops(rollout) == gen_flops - 2 * not_matmul * B * (P + R - 1)
