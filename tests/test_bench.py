"""bench.py end to end on a very small model: a row per stage, every figure finite and positive; and
MFU's two parts, the peak measurement and the FLOP formula (against torch's own FLOP counter). Not a
timing test: the times themselves depend on the machine and its load."""
import itertools
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, GPTConfig
from scripts import function_defs, run_script

ROWS = ['sft', 'rm', 'dpo', 'dpo_ref_precomputed', 'ppo_rollout_no_kv_cache', 'ppo_rollout_hf_generate',
        'ppo_rollout', 'ppo_score',
        'ppo_update_1x1', 'ppo_iteration_1x1', 'ppo_update_4x1', 'ppo_iteration_4x1',
        'ppo_update_4x2', 'ppo_iteration_4x2']


def test_bench_prints_a_row_per_stage():
    # a given peak: the measured one is a few seconds of large matmuls (measure_peak_flops is tested below)
    p = run_script('bench.py', '--steps=1', '--warmup=0', '--n_layer=1', '--n_head=2', '--n_embd=32',
                   '--vocab_size=512', '--batch_size=4', '--prompt_len=8', '--response_len=8', '--threads=1',
                   '--decode=static', '--grad_checkpoint=True', '--peak_flops=2e6', timeout=300)
    # the static-shape rollout and checkpointed training passes (model tests cover the defaults)
    lines = p.stdout.splitlines()
    first = next(line for line in lines if line.startswith('bench:'))
    assert first.startswith('bench: preset tiny, cpu, 1 threads, float32, grad checkpointing; GPT 1L/2H/32d'), first
    assert 'peak for MFU: 0.0 GFLOP/s (given)' in lines, p.stdout
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ['stage', 's/step'])
    table = {line.split()[0]: line.split()[1:] for line in lines[header + 1:] if line.strip()}
    assert list(table) == ROWS, p.stdout
    for name, cells in table.items():
        sec, tokens, tokens_per_s, mem, mfu = cells
        assert mfu.endswith('%'), (name, cells)
        numbers = [float(sec), int(tokens), float(tokens_per_s), float(mem), float(mfu[:-1])]
        assert all(math.isfinite(x) and x > 0 for x in numbers), (name, cells)
        assert int(tokens) == 4 * 16 * (2 if name in ('rm', 'dpo', 'dpo_ref_precomputed') else 1), (name, cells)
        # a 2 MFLOP/s peak: any real step of this model is far above 100%
        assert float(mfu[:-1]) > 100, (name, cells)


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
