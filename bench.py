"""
Time each stage's steady-state step in isolation, on synthetic data of fixed shapes (nanoGPT's
bench.py, for RLHF): the SFT step, the reward-model step, the DPO step (reference log-probs online
and precomputed) and one PPO iteration, split into rollout (policy.generate), scoring (reference,
reward and value forwards, plus the policy's under bf16/TF32, where train_ppo.py recomputes it;
rewards, GAE) and update, at 1 epoch x 1 minibatch, 4 x 1 (TRL's default) and 4 x 2. Two rollout
baselines beside ours: running the whole sequence at every step (no KV cache), and Hugging Face
generate on a GPT-2 of the same shape (when transformers is installed). Each step runs what the
training scripts run: the same model calls, and the losses and PPO math imported from train_*.py
(their source above the config banner).

Every sequence is exactly prompt_len + response_len tokens, and a PPO response is exactly
response_len new tokens: generate gets eos_id=-1, a token that can never be sampled. So the
figures compare with ../shared/peers (TRL's trainers on the same shapes). Per row: seconds per
step (the median of the timed steps after warmup), tokens/s, peak memory (peak RSS of the process
during the stage on a CPU, torch.cuda.max_memory_allocated on a GPU) and MFU: model FLOPs (PaLM
appendix B: 6 x params + attention per token for forward + backward, a forward-only pass a third
of that, the vocabulary head counted only at the positions where it runs) over the peak FLOP/s,
measured with a large matmul in the benchmark's dtype before and after the stages (the higher of
the two), except on a GPU in bf16 that the data-sheet table below knows (H100, H200, A100), where
MFU is quoted, as is usual, against the dense bf16 peak of the data sheet (the matmul measured is
printed beside it), and unless peak_flops is given. Each stage prints its rows as it finishes; the
table with MFU comes at the end.

    python bench.py                             # tiny preset: fp32 on the CPU, 2 threads
    python bench.py --preset=gpt2               # GPT-2 124M shape, bf16 autocast, on a GPU
    python bench.py --stages=sft,dpo --steps=20 --compile=True   # compiled on a CPU too (default: on CUDA only)
"""
import gc
import os
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from common import default_compile, default_device, sampling_logprobs_exact, setup, wrap_for_training
from configurator import check, configure
from loaders import collate
from model import GPT, GPTConfig

_ROOT = os.path.dirname(os.path.abspath(__file__))  # _: not a config key
PRESETS = {  # what a 0 or '' below stands for
    'tiny': dict(n_layer=4, n_head=4, n_embd=128, vocab_size=8192, batch_size=16, prompt_len=32, response_len=32,
                 dtype='float32'),
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, batch_size=16, prompt_len=256,
                 response_len=256, dtype='bfloat16'),
}


def script_functions(name):
    """The pure functions of a train_*.py script: its source above the '# default config values' banner."""
    path = os.path.join(_ROOT, name)
    with open(path) as f:
        head = f.read().split('\n# default config values')[0]
    ns = {'__name__': name}
    exec(compile(head, path, 'exec'), ns)
    return SimpleNamespace(**ns)


sft_fns, rm_fns = script_functions('train_sft.py'), script_functions('train_reward_model.py')
dpo_fns, ppo_fns = script_functions('train_dpo.py'), script_functions('train_ppo.py')

# -----------------------------------------------------------------------------
# default config values
preset = 'tiny'                 # 'tiny' (CPU, fp32) | 'gpt2' (GPT-2 124M shape, bf16, for a GPU)
stages = 'sft,rm,dpo,ppo'       # stages to time, comma-separated
steps = 10                      # timed steps per row (the median is reported)
warmup = 3                      # untimed steps before them
n_layer = 0                     # transformer blocks (0: the preset's, as every 0 and '' below)
n_head = 0                      # attention heads
n_embd = 0                      # width
vocab_size = 0                  # vocabulary
batch_size = 0                  # sequences per step (RM and DPO: pairs; PPO: prompts)
prompt_len = 0                  # prompt tokens of every sequence
response_len = 0                # response tokens of every sequence (PPO: new tokens sampled)
dtype = ''                      # 'float32' | 'bfloat16' (autocast)
device = default_device()       # 'cpu' | 'cuda' | 'cuda:1' ...
threads = 2                     # torch threads on a CPU (0: torch's default)
compile = default_compile()     # torch.compile the training passes, as the scripts' default (on for CUDA)
grad_checkpoint = False         # recompute activations in the backward pass, as the scripts' grad_checkpoint=True
tf32 = True                     # CUDA: TF32 matmuls for the float32 work, as the scripts' tf32
flash_attention = True          # CUDA: allow the flash kernel in scaled_dot_product_attention, as the scripts'
fused_adamw = True              # AdamW as one fused kernel, as the scripts' fused_adamw
pin_memory = True               # CUDA: batches copied from pinned host memory, as the scripts' pin_memory
decode = 'dynamic'              # PPO rollout decode steps: 'dynamic' | 'static' | 'compiled' (as train_ppo.py's decode)
peak_flops = 0.0                # the device's peak FLOP/s for MFU (0: measure it with a large matmul)
seed = 1337                     # seeds the synthetic data and the weights
# -----------------------------------------------------------------------------
config = configure(globals())
check(preset in PRESETS, f"preset must be one of {list(PRESETS)}, got {preset!r}")
globals().update({k: v for k, v in PRESETS[preset].items() if not config[k]})
check(steps > 0 and warmup >= 0 and threads >= 0 and peak_flops >= 0, "need steps > 0, warmup, threads, peak_flops >= 0")
check(batch_size % 2 == 0 and prompt_len > 0 and response_len > 1, "need an even batch_size, prompt_len > 0, response_len > 1")
check(not set(stages.split(',')) - {'sft', 'rm', 'dpo', 'ppo'}, f"unknown stage in {stages!r} (sft, rm, dpo, ppo)")
check(decode in ('dynamic', 'static', 'compiled'), f"decode must be 'dynamic', 'static' or 'compiled', got {decode!r}")

if threads and 'cuda' not in device:
    torch.set_num_threads(threads)
if compile:  # the four stages compile GPT.forward for 7 kinds of call in one process, each recompiled for new shapes
    # and grad modes: more than the default limit of 8 recompiles (the setting's name before torch 2.7: cache_size_limit)
    setattr(torch._dynamo.config, 'recompile_limit' if hasattr(torch._dynamo.config, 'recompile_limit') else 'cache_size_limit', 64)
_, _, _, device, ctx = setup(device, dtype, seed, tf32=tf32, flash_attention=flash_attention)
device_type = 'cuda' if 'cuda' in device else 'cpu'
B, P, R, T = batch_size, prompt_len, response_len, prompt_len + response_len
EOT = vocab_size - 1  # the end-of-text id, as in get_tokenizer; every response ends with it

# -----------------------------------------------------------------------------
# timing, memory, FLOPs


def clock():
    if device_type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter()


def run(step):
    """Call step() warmup + steps times; it returns clock() marks (start, end of phase 1, ...).
    Returns the median seconds of each phase over the timed steps, and of the whole step last."""
    marks = [step() for _ in range(warmup + steps)][warmup:]
    phases = [statistics.median(m[i + 1] - m[i] for m in marks) for i in range(len(marks[0]) - 1)]
    return phases + [statistics.median(m[-1] - m[0] for m in marks)]


def reset_peak_memory():
    gc.collect()
    if device_type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # Linux: the peak RSS (VmHWM) starts again from the current RSS
        except OSError:
            pass  # elsewhere the peak is the process's since start-up


def peak_memory():
    """Bytes: the peak CUDA allocation, or the process's peak RSS since reset_peak_memory."""
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated()
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak, not the stage's
        return peak if sys.platform == 'darwin' else peak * 1024  # bytes on macOS, kB elsewhere


def flops(model, n_tokens, ctx_len, head_rows, passes=3):
    """Model FLOPs of n_tokens tokens that each attend to ctx_len positions, the vocabulary head run at
    head_rows of them (none for a scalar head); passes=3: forward + backward, 1: forward only."""
    head = 6 * model.config.vocab_size * model.config.n_embd
    return passes / 3 * ((model.flops_per_token(ctx_len) - head) * n_tokens + head * head_rows)


PEAK_MATMUL = (8192, 20) if device_type == 'cuda' else (2048, 2)  # matrix size, matmuls per timing
# dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets, by a part of the device's name (the
# first match wins: PCIe and NVL before the SXM part, which the name 'NVIDIA H100 80GB HBM3' does not say)
DATASHEET_BF16 = [('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200 NVL', 835e12), ('H200', 989e12),
                  ('A100', 312e12)]


def measure_peak_flops():
    """The best FLOP/s of a large square matmul in the benchmark's dtype: the roof for MFU."""
    n, reps = PEAK_MATMUL
    mm_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    a, b = (torch.randn(n, n, device=device, dtype=mm_dtype) for _ in range(2))
    times = []
    for _ in range(6):
        t0 = clock()
        for _ in range(reps):
            a @ b
        times.append((clock() - t0) / reps)
    return 2 * n ** 3 / min(times[1:])  # the first round warms up


# -----------------------------------------------------------------------------
# synthetic data: random token ids (never EOT inside a text); every response ends with EOT
gen = torch.Generator().manual_seed(seed)


def text(n):
    return torch.randint(0, EOT, (n,), generator=gen).tolist()


examples = [(text(P), text(R - 1) + [EOT]) for _ in range(B)]                   # SFT
pairs = [(text(P), text(R - 1) + [EOT], text(R - 1) + [EOT]) for _ in range(B)]  # RM, DPO
prompts = [text(P) for _ in range(B)]                                             # PPO


def new_model(scalar_head=False):
    torch.manual_seed(seed)  # every model starts from the same weights
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T, vocab_size=vocab_size,
                    dropout=0.0, bias=True, scalar_head=scalar_head)
    return GPT(cfg).to(device)


def for_training(model):
    """What the training passes go through, as in the scripts: compiled if asked, and recomputing
    each block's activations in the backward pass with grad_checkpoint."""
    return wrap_for_training(model, compile, False, device, grad_checkpoint)


def optimizer_step(model, optimizer):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

# -----------------------------------------------------------------------------
# the stages: each returns rows (name, seconds per step, tokens per step, FLOPs per step)


def bench_sft():
    model = new_model()
    optimizer, train_model = model.configure_optimizers(0.1, 2e-3, (0.9, 0.95), fused_adamw), for_training(model)

    def step():
        t0 = clock()
        seq, targets, _ = collate(examples, EOT, device, pin_memory)
        with ctx:
            logprobs, _ = train_model(seq[:, :-1], targets)
            loss = sft_fns.sft_loss(logprobs, targets, (targets >= 0).sum().float())
        loss.backward()
        optimizer_step(model, optimizer)
        return t0, clock()
    return [('sft', run(step)[0], B * T, flops(model, B * (T - 1), T - 1, B * R))]


def collate_pairs():
    """[chosen rows; rejected rows] (2B, T), as train_reward_model.py and train_dpo.py batch them."""
    return collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], EOT, device, pin_memory)


def bench_rm():
    model = new_model(scalar_head=True)
    optimizer, train_model = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), fused_adamw), for_training(model)

    def step():
        t0 = clock()
        seq, _, lengths = collate_pairs()
        with ctx:
            chosen, rejected = rm_fns.last_token_rewards(train_model, seq, lengths).float().split(B)
            loss = rm_fns.bradley_terry_loss(chosen, rejected)
        loss.backward()
        optimizer_step(model, optimizer)
        return t0, clock()
    return [('rm', run(step)[0], 2 * B * T, flops(model, 2 * B * T, T, 0))]


def bench_dpo():
    model, ref_model = new_model(), new_model().eval().requires_grad_(False)
    optimizer, train_model = model.configure_optimizers(0.0, 1e-4, (0.9, 0.95), fused_adamw), for_training(model)
    with torch.no_grad(), ctx:  # the reference log-probs of precompute_ref_logps=True, computed before training
        seq, targets, _ = collate_pairs()
        ref_precomputed = dpo_fns.sequence_logps(ref_model, seq, targets).float().split(B)

    def step(precomputed):
        t0 = clock()
        seq, targets, _ = collate_pairs()
        with ctx:
            chosen, rejected = dpo_fns.sequence_logps(train_model, seq, targets).float().split(B)
        if precomputed:
            ref_chosen, ref_rejected = (x.to(device) for x in ref_precomputed)
        else:
            with torch.no_grad(), ctx:
                ref_chosen, ref_rejected = dpo_fns.sequence_logps(ref_model, seq, targets).float().split(B)
        losses, _, _ = dpo_fns.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
        (losses.sum() / B).backward()
        optimizer_step(model, optimizer)
        return t0, clock()
    policy_flops = flops(model, 2 * B * (T - 1), T - 1, 2 * B * R)
    return [('dpo', run(lambda: step(False))[0], 2 * B * T, policy_flops * 4 / 3),  # + the reference's forward
            ('dpo_ref_precomputed', run(lambda: step(True))[0], 2 * B * T, policy_flops)]


def bench_ppo():
    temperature = 0.7
    policy, ref_model = new_model(), new_model().eval().requires_grad_(False)
    reward_model = new_model(scalar_head=True).eval().requires_grad_(False)
    value_model = new_model(scalar_head=True)
    params = [p for m in (policy, value_model) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-5, fused=fused_adamw)
    train_policy, train_value = for_training(policy), for_training(value_model)
    rows = torch.arange(B, device=device)
    exact = sampling_logprobs_exact(dtype)

    def iteration(epochs, minibatches):
        """train_ppo.py's loop body, phases 1-5: rollout, score, rewards and GAE, update."""
        t0 = clock()
        policy.eval()
        with torch.no_grad(), ctx:  # eos_id -1: never sampled, so every response is R tokens
            seq, seq_mask, old_logprobs, response_mask = policy.generate(prompts, R, -1, temperature, decode=decode)
        policy.train()
        t1 = clock()
        assert response_mask.size(1) == R and bool(response_mask.all()), "every response must be R tokens"
        response_mask = response_mask.float()
        lengths = response_mask.sum(1).long()
        ended = seq[rows, P + lengths - 1] == EOT
        targets = torch.full_like(seq[:, :-1], -1)  # train_ppo's response_targets
        targets[:, P - 1:] = seq[:, P:].masked_fill(response_mask == 0, -1)
        with torch.no_grad(), ctx:
            rm_scores = reward_model(seq, attention_mask=seq_mask)[0][rows, P + lengths - 1]
            ref_logprobs = ref_model(seq[:, :-1], targets, seq_mask[:, :-1], temperature)[0][:, P - 1:]
            old_values = value_model(seq[:, :-1], attention_mask=seq_mask[:, :-1])[0][:, P - 1:] * response_mask
            if not exact:  # train_ppo's rule: under bfloat16 / TF32, pi_old comes from a forward pass
                old_logprobs = policy(seq[:, :-1], targets, seq_mask[:, :-1], temperature)[0][:, P - 1:]
        scores = ppo_fns.reward_scores(rm_scores.float(), ended, -1.0)
        rewards, _ = ppo_fns.per_token_rewards(scores, old_logprobs, ref_logprobs, response_mask, 0.05)
        advantages, returns = ppo_fns.gae(rewards, old_values, response_mask, 1.0, 0.95)
        advantages = ppo_fns.whiten(advantages, response_mask)
        t2 = clock()
        for _ in range(epochs):
            order = torch.randperm(B, device=device)
            for mb in order.split(B // minibatches):
                mask = response_mask[mb]
                with ctx:
                    # with_entropy=True as in train_ppo.py, which logs the policy's entropy
                    (new_logprobs, _), _ = train_policy(seq[mb, :-1], targets[mb], seq_mask[mb, :-1], temperature, True)
                    new_values = train_value(seq[mb, :-1], attention_mask=seq_mask[mb, :-1])[0]
                pg_loss, _, _, _ = ppo_fns.ppo_policy_loss(new_logprobs[:, P - 1:], old_logprobs[mb], advantages[mb], mask, 0.2)
                vf_loss, _ = ppo_fns.ppo_value_loss(new_values[:, P - 1:].float(), old_values[mb], returns[mb], mask, 0.2)
                (pg_loss + 0.1 * vf_loss).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return t0, t1, t2, clock()

    gen_flops = flops(policy, B * P, P, B, 1) + sum(flops(policy, B, P + t + 1, B, 1) for t in range(R - 1))
    logprob_passes = 1 if exact else 2  # the reference's, and the policy's where pi_old is recomputed
    score_flops = flops(reward_model, B * T, T, 0, 1) + logprob_passes * flops(ref_model, B * (T - 1), T - 1, B * R, 1) + \
        flops(value_model, B * (T - 1), T - 1, 0, 1)
    epoch_flops = flops(policy, B * (T - 1), T - 1, B * R) + flops(value_model, B * (T - 1), T - 1, 0)
    @torch.no_grad()
    def rollout_without_cache():
        """The baseline the KV cache is measured against: every step runs the whole sequence so far
        (prompts all P tokens, so no mask), samples the last position's token the same way."""
        t0 = clock()
        policy.eval()
        seq = torch.tensor(prompts, device=device)
        with ctx:
            for _ in range(R):
                logits = policy(seq)[0][:, -1].float() / temperature
                token = torch.multinomial(torch.softmax(logits, -1), 1)
                seq = torch.cat([seq, token], 1)
        policy.train()
        return t0, clock()

    out = [('ppo_rollout_no_kv_cache', run(rollout_without_cache)[0], B * T,
            sum(flops(policy, B * (P + t), P + t, B * (P + t), 1) for t in range(R)))]
    try:  # Hugging Face generate on a GPT-2 of the same shape, when transformers is installed
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("(no ppo_rollout_hf_generate row: transformers is not installed)")
    else:
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=T, n_embd=n_embd, n_layer=n_layer,
                                        n_head=n_head, bos_token_id=EOT, eos_token_id=EOT)).to(device).eval()
        hf_prompts = torch.tensor(prompts, device=device)

        @torch.no_grad()
        def rollout_hf():
            t0 = clock()
            with ctx:  # sampling at the same temperature, exactly R new tokens (no eos in its config)
                hf.generate(hf_prompts, attention_mask=torch.ones_like(hf_prompts), do_sample=True, temperature=temperature,
                            top_k=0, max_new_tokens=R, min_new_tokens=R, pad_token_id=EOT, eos_token_id=None)
            return t0, clock()
        out.append(('ppo_rollout_hf_generate', run(rollout_hf)[0], B * T, gen_flops))
        del hf
    for epochs, minibatches in ((1, 1), (4, 1), (4, 2)):
        rollout, score, update, total = run(lambda: iteration(epochs, minibatches))
        name = f'{epochs}x{minibatches}'
        if epochs == 1:
            out += [('ppo_rollout', rollout, B * T, gen_flops), ('ppo_score', score, B * T, score_flops)]
        out += [(f'ppo_update_{name}', update, B * T, epochs * epoch_flops),
                (f'ppo_iteration_{name}', total, B * T, gen_flops + score_flops + epochs * epoch_flops)]
    return out

# -----------------------------------------------------------------------------
# measure and print


peak_before = 0.0 if peak_flops else measure_peak_flops()
n_params = new_model().get_num_params()
where = torch.cuda.get_device_name(device) if device_type == 'cuda' else f'cpu, {torch.get_num_threads()} threads'
options = ''.join(f', {name}' for name, on in [('compiled', compile), ('grad checkpointing', grad_checkpoint)] if on)
options += ''.join(f', {name} off' for name, on in [('TF32', tf32), ('flash attention', flash_attention),
                                                     ('fused AdamW', fused_adamw), ('pinned memory', pin_memory)] if not on)
print(f"bench: preset {preset}, {where}, {dtype}{options}; GPT {n_layer}L/{n_head}H/{n_embd}d, "
      f"vocab {vocab_size}, {n_params / 1e6:.2f}M params; batch {B}, prompt {P} + response {R} tokens; "
      f"{warmup} warmup + {steps} timed steps")
if device_type == 'cpu':
    reset_peak_memory()  # VmHWM so far is the start-up's and the peak matmul's peak, not the RSS now
    print(f"RSS before the stages: {peak_memory() / 2**20:.0f} MiB (peak MiB below: the process's peak RSS in each stage)")
table = []
for stage in stages.split(','):
    reset_peak_memory()
    rows = {'sft': bench_sft, 'rm': bench_rm, 'dpo': bench_dpo, 'ppo': bench_ppo}[stage]()
    mem = peak_memory()
    table += [(name, sec, tokens, flop, mem) for name, sec, tokens, flop in rows]
    # as it finishes: a long run cut short still says what it measured
    print(f"{stage} done: " + ', '.join(f"{name} {sec:.4f} s" for name, sec, _, _ in rows), flush=True)
datasheet = next((f for part, f in DATASHEET_BF16 if part in where), 0.0) if device_type == 'cuda' and dtype == 'bfloat16' else 0.0
if not peak_flops:  # measured before and after the stages: a busy moment lowers one, not both
    peak_after = measure_peak_flops()
    measured = max(peak_before, peak_after)
    n, reps = PEAK_MATMUL
    peak_source = (f"the best of 5 x {reps} {n}x{n} {dtype} matmuls, before the stages "
                   f"{peak_before / 1e9:.1f} and after {peak_after / 1e9:.1f}")
    if datasheet:
        peak_flops, peak_source = datasheet, f"the data sheet's dense bf16 peak; measured: {peak_source}"
    else:
        peak_flops, peak_source = measured, f"measured: {peak_source}"
else:
    peak_source = 'given'
print(f"peak for MFU: {peak_flops / 1e9:.1f} GFLOP/s ({peak_source})")
print(f"{'stage':<22} {'s/step':>9} {'tokens/step':>12} {'tokens/s':>10} {'peak MiB':>9} {'MFU':>7}")
for name, sec, tokens, flop, mem in table:
    print(f"{name:<22} {sec:>9.4f} {tokens:>12} {tokens / sec:>10.0f} {mem / 2**20:>9.0f} {100 * flop / sec / peak_flops:>6.2f}%")
