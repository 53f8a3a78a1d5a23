"""
Direct Preference Optimization (Rafailov et al. 2023, eq. 7): fit the preferences directly with
the policy, with no reward model and no sampling. With the margin of log-ratios

    h = (log pi_theta(y_w|x) - log pi_ref(y_w|x)) - (log pi_theta(y_l|x) - log pi_ref(y_l|x))

the losses, averaged over the pairs of the batch, are
    sigmoid (DPO)       L = -log sigmoid(beta h)
    label_smoothing eps L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                        (conservative DPO, Mitchell 2023: labels flipped with probability eps;
                        the minimum is at h* = ln((1 - eps) / eps) / beta, not at infinity)
    ipo (Azar 2023)     L = (h - 1 / (2 beta))^2   (a target margin instead of an unbounded one)
dL/dh = -beta sigmoid(-beta h) for DPO: pairs the policy already ranks right count less.

What lives where: log pi(y|x) is the SUM of the response tokens' log-probs (the <|endoftext|>
that ends the response included; prompt tokens are conditioning only), from one forward pass of
[chosen rows; rejected rows] per model. pi_ref is the SFT model, frozen. Dropout is off in both
models: with it, pi_theta != pi_ref at step 0 even with equal weights. The implicit reward
r(x, y) = beta (log pi_theta(y|x) - log pi_ref(y|x)) is what the logged rewards/* metrics show.
Left out: online sampling, length normalisation of log pi (this IPO sums, as the paper's h does),
and any reward model. precompute_ref_logps=True runs pi_ref once before training over the val
pairs and the train pairs the run will use, then frees it: the same numbers, one model's memory less.

    python train_dpo.py                               # built-in world, from out/sft/best.pt, CPU
    python train_dpo.py --beta=0.3 --loss_type=ipo    # any default below can be overridden
    python train_dpo.py config/dpo_gpt2_hh.py         # GPT-2 on Anthropic HH-RLHF, one GPU
    torchrun --standalone --nproc_per_node=8 train_dpo.py config/dpo_gpt2_hh.py
"""
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (all_reduce_mean, check_finite, default_compile, default_device, default_dtype, end_ddp, get_lr,
                    get_tokenizer, model_from_checkpoint, open_log, require_checkpoint, restore_rng,
                    save_checkpoint, setup, wrap_for_training)
from configurator import check, configure
from loaders import batch_indices, collate, read_jsonl, tokenize_prefs

# -----------------------------------------------------------------------------
# the math: pure functions, tensors in and out (checked against closed forms in tests/)


def sequence_logps(model, seq, targets):
    """log pi(y|x) (2B,): the sum of the response tokens' log-probs (0 where targets is -1)."""
    logprobs, _ = model(seq[:, :-1], targets)  # (2B, T-1)
    return logprobs.sum(-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type='sigmoid', label_smoothing=0.0):
    """Per-pair losses (B,) and the implicit rewards beta * (log pi - log pi_ref) of chosen and
    rejected (B,), detached. See the docstring at the top for the equations."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == 'sigmoid':
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == 'ipo':
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# -----------------------------------------------------------------------------
# default config values: the built-in world (data/tinyhh), the tiny SFT model, on a CPU
out_dir = 'out/dpo'                           # checkpoints: ckpt.pt (latest, to resume) and best.pt (best val loss)
sft_ckpt = 'out/sft/best.pt'                  # the SFT model: the policy's start and the frozen reference
train_file = 'data/tinyhh/prefs_train.jsonl'  # {"prompt", "chosen", "rejected"} per line
val_file = 'data/tinyhh/prefs_val.jsonl'      # held-out pairs for the validation loss and metrics
train_subset = 0                              # use only the first N training pairs (0: all; 64: an overfit check)
init_from = 'sft'                             # 'sft' (from sft_ckpt) | 'resume' (from out_dir/ckpt.pt)
block_size = 128                              # longest prompt + response, in tokens
# the objective
beta = 0.5                                    # strength of the implicit KL penalty to the reference (0.1 drifts into garbled tokens here)
loss_type = 'sigmoid'                         # 'sigmoid' (DPO) | 'ipo'
label_smoothing = 0.0                         # eps of conservative DPO: the assumed rate of flipped labels (sigmoid only)
precompute_ref_logps = False                  # run the reference once over the pairs the run uses, then free it
# optimization
batch_size = 32                               # preference pairs per optimizer step, summed over all processes
micro_batch_size = 32                         # pairs per forward pass per process (2x rows: chosen and rejected)
max_steps = 0                                 # optimizer steps (0: one epoch over the training pairs)
learning_rate = 1e-4                          # peak learning rate
min_lr_ratio = 0.1                            # final learning rate as a fraction of the peak
warmup_steps = 20                             # linear warmup steps
weight_decay = 0.0                            # AdamW weight decay, on matrices only (the KL to pi_ref already regularises)
beta1 = 0.9                                   # AdamW beta1
beta2 = 0.95                                  # AdamW beta2
grad_clip = 1.0                               # clip the gradient norm at this value (0: off)
skip_nonfinite = False                        # on a NaN/inf loss or gradient: skip the step (True) or stop (False)
# evaluation, logging, checkpoints
eval_interval = 50                            # steps between validation evals (and checkpoints)
eval_batches = 16                             # validation eval: the first eval_batches x batch_size pairs (0: all of val_file)
seed = 1337                                   # seeds the data order
# system
device = default_device()                     # 'cpu' | 'cuda' | 'cuda:1' ...
dtype = default_dtype()                       # 'float32' | 'bfloat16' (float16 would need loss scaling)
compile = default_compile()                   # torch.compile the policy's training passes: on by default on CUDA, off on a CPU
tf32 = True                                   # CUDA: TF32 matmuls for the float32 work (False: exact float32)
flash_attention = True                        # CUDA: allow the flash kernel in scaled_dot_product_attention
fused_adamw = True                            # AdamW as one fused kernel (False: torch's per-tensor loop; same math)
pin_memory = True                             # CUDA: batches copied from pinned host memory, without waiting
grad_checkpoint = False                       # recompute activations in the backward pass: less memory (gpt2-large/xl), ~1/3 slower
# -----------------------------------------------------------------------------
config = configure(globals())
check(init_from in ('sft', 'resume'), f"init_from must be 'sft' or 'resume', got {init_from!r}")
check(loss_type in ('sigmoid', 'ipo'), f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
check(beta > 0 and 0 <= label_smoothing < 0.5, "need beta > 0 and 0 <= label_smoothing < 0.5")
check(label_smoothing == 0 or loss_type == 'sigmoid', "label_smoothing applies to loss_type='sigmoid' only")
check(batch_size > 0 and micro_batch_size > 0 and max_steps >= 0, "need batch_size, micro_batch_size > 0 and max_steps >= 0")
check(learning_rate > 0 and 0 <= min_lr_ratio <= 1 and grad_clip >= 0, "need learning_rate > 0, 0 <= min_lr_ratio <= 1, grad_clip >= 0")
check(block_size >= 2, f"block_size must be >= 2 (a prompt token and a response token), got {block_size}")
check(train_subset >= 0 and weight_decay >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1,
      "need train_subset >= 0 (0: all), weight_decay >= 0, 0 <= beta1, beta2 < 1")
check(eval_interval > 0 and eval_batches >= 0 and warmup_steps >= 0, "need eval_interval > 0, eval_batches >= 0, warmup_steps >= 0")

# -----------------------------------------------------------------------------
# set-up: processes, device, precision
ddp, rank, world_size, device, ctx = setup(device, dtype, seed, tf32=tf32, flash_attention=flash_attention)
master = rank == 0
check(batch_size % (micro_batch_size * world_size) == 0,
      f"batch_size {batch_size} must be divisible by micro_batch_size {micro_batch_size} x {world_size} processes")
device_type = 'cuda' if 'cuda' in device else 'cpu'

# -----------------------------------------------------------------------------
# the models: the policy (from the SFT model, or resumed) and the frozen reference (the SFT model)
start_step, best_val = 0, float('inf')
ckpt_path, best_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')
sft = require_checkpoint(sft_ckpt, stage='sft',
                         hint=f'train it first: python train_sft.py [its config file] --out_dir={os.path.dirname(sft_ckpt)}')
ref_model, model_args = model_from_checkpoint(sft, dropout=0.0)
ref_model.to(device).eval().requires_grad_(False)
if init_from == 'resume':
    ckpt = require_checkpoint(ckpt_path, stage='dpo', hint=f"nothing to resume in {out_dir}", resume_config=config)
    model, _ = model_from_checkpoint(ckpt, dropout=0.0)
    start_step, best_val = ckpt['step'], ckpt['best_val']
else:
    model, _ = model_from_checkpoint(sft, dropout=0.0)
del sft
check(model_args['block_size'] >= block_size, f"block_size {block_size} > the model's {model_args['block_size']}")
model.to(device)
enc = get_tokenizer(model_args['vocab_size'])
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), fused_adamw)
if init_from == 'resume':
    optimizer.load_state_dict(ckpt['optimizer'])
    restore_rng(ckpt)
    del ckpt
if master:
    print(f"models: policy and reference of {model.get_num_params() / 1e6:.2f}M parameters, vocabulary {model_args['vocab_size']}")
train_model = wrap_for_training(model, compile, ddp, device, grad_checkpoint)  # compiled and/or DDP; model stays the plain GPT

# -----------------------------------------------------------------------------
# data: (prompt, chosen, rejected) token ids
train = tokenize_prefs(read_jsonl(train_file, 'prefs'), enc, block_size, train_file)
val = tokenize_prefs(read_jsonl(val_file, 'prefs'), enc, block_size, val_file)
if train_subset:
    check(train_subset <= len(train), f"{train_file}: {len(train)} pairs, fewer than train_subset {train_subset}")
    train = train[:train_subset]
check(len(train) >= batch_size, f"{train_file}: {len(train)} pairs, fewer than one batch of {batch_size}")
max_steps = max_steps or len(train) // batch_size
if master:
    print(f"data: {len(train)} train and {len(val)} val pairs; {max_steps} steps of {batch_size} pairs, "
          f"{batch_size // (micro_batch_size * world_size)} micro-batches of {micro_batch_size} x {world_size} processes")


def collate_pairs(pairs):
    """One batch of 2B rows, [chosen rows; rejected rows]: seq (2B, T), targets (2B, T-1), -1 off the response."""
    seq, targets, _ = collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], enc.eot_token, device, pin_memory)
    return seq, targets


@torch.no_grad()
def reference_logps(pairs, indices):
    """log pi_ref of the chosen and rejected responses of pairs[indices]: two tensors (N,) in pair
    order, NaN at the pairs left out (used by mistake, a NaN stops the run)."""
    chosen, rejected = torch.full((len(pairs),), float('nan')), torch.full((len(pairs),), float('nan'))
    for i in range(0, len(indices), micro_batch_size):
        idx = indices[i:i + micro_batch_size]
        seq, targets = collate_pairs([pairs[j] for j in idx])
        with ctx:
            chosen[idx], rejected[idx] = sequence_logps(ref_model, seq, targets).float().cpu().view(2, -1)
    return chosen, rejected


# out_dir/log.jsonl, one JSON row per step, by rank 0: opened before the reference's log-probs are
# precomputed, which can take minutes
log = open_log(out_dir, start_step, master, ddp, device)
# the val pairs this process evaluates, micro-batch by micro-batch: its share of the first eval_batches x batch_size
val_stop = len(val) if eval_batches == 0 else min(len(val), eval_batches * batch_size)
val_batches = [list(range(i, min(i + micro_batch_size, val_stop)))
               for i in range(rank * micro_batch_size, val_stop, micro_batch_size * world_size)]
ref_train = ref_val = None
if precompute_ref_logps:
    t = time.time()
    # only the pairs this process trains on from here to max_steps: a short run stays short, and
    # under DDP each process computes its own share
    used = sorted({i for step in range(start_step, max_steps)
                   for i in batch_indices(len(train), batch_size, step, seed, rank, world_size)})
    used_val = [i for indices in val_batches for i in indices]
    ref_train, ref_val = reference_logps(train, used), reference_logps(val, used_val)
    del ref_model  # from here on the reference is these 2 (N_train + N_val) numbers
    ref_model = None
    if device_type == 'cuda':
        torch.cuda.empty_cache()
    if master:
        print(f"reference log-probs of {len(used)} train and {len(used_val)} val pairs precomputed in {time.time() - t:.0f} s; "
              f"reference model freed")


def pair_logps(policy, pairs, indices, ref):
    """Policy and reference log-probs (each a (chosen, rejected) pair of (B,) tensors) for pairs. indices: the
    pairs' positions in their split, where ref, the precomputed (chosen, rejected) log-probs, holds theirs;
    ref None: run ref_model."""
    seq, targets = collate_pairs(pairs)
    with ctx:
        chosen, rejected = sequence_logps(policy, seq, targets).float().split(len(pairs))
    if ref is not None:  # precomputed
        return (chosen, rejected), (ref[0][indices].to(device), ref[1][indices].to(device))
    with torch.no_grad(), ctx:
        ref_chosen, ref_rejected = sequence_logps(ref_model, seq, targets).float().split(len(pairs))
    return (chosen, rejected), (ref_chosen, ref_rejected)


METRICS = ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
           'logps/chosen', 'logps/rejected', 'count')


def pair_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """Sums over the pairs, in the order of METRICS (accuracy strict >: a tie is not a win)."""
    margins = chosen_rewards - rejected_rewards
    sums = [losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(), (margins > 0).sum(),
            margins.sum(), chosen_logps.detach().sum(), rejected_logps.detach().sum(), torch.tensor(len(losses))]
    return torch.stack([s.double().to(losses.device) for s in sums])


def means(sums):
    """Metric sums (over the pairs of all processes) to means."""
    totals = (all_reduce_mean(sums, ddp) * world_size).tolist()
    return {k: v / totals[-1] for k, v in zip(METRICS[:-1], totals)}


@torch.no_grad()
def evaluate():
    """The metrics on the first eval_batches x batch_size pairs of val (0: all of it), the same pairs
    however many processes share them."""
    model.eval()
    sums = torch.zeros(len(METRICS), device=device, dtype=torch.float64)
    for indices in val_batches:
        (chosen, rejected), (ref_chosen, ref_rejected) = pair_logps(model, [val[j] for j in indices], indices, ref_val)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing)
        sums += pair_stats(losses, chosen_rewards, rejected_rewards, chosen, rejected)
    model.train()  # no dropout in either model: train() only matters to code that checks it
    return means(sums)


def fmt(metrics):
    return ', '.join(f"{k} {v:.4f}" for k, v in metrics.items())


def save(path, step, optimizer):
    save_checkpoint(path, model, optimizer, model_args, config, 'dpo', step, best_val=best_val)


# -----------------------------------------------------------------------------
# training loop
model.train()
t0, tokens_seen, train_metrics, val_metrics = time.time(), 0, {}, {}
# steps run 0 .. max_steps - 1; the extra pass at step == max_steps evaluates and saves the final weights
bar = tqdm(range(start_step, max_steps + 1), initial=start_step, total=max_steps, disable=not master, desc='dpo', mininterval=1.0)
for step in bar:
    lr = get_lr(step, learning_rate, warmup_steps, max_steps, min_lr_ratio)
    if step % eval_interval == 0 or step == max_steps:
        val_metrics = evaluate()
        if master:
            improved = val_metrics['loss'] < best_val
            best_val = min(best_val, val_metrics['loss'])
            if improved:  # best.pt first: a kill between the two saves resumes before this step and redoes both
                save(best_path, step, None)
            if math.isfinite(val_metrics['loss']):  # weights that give a NaN/inf loss are never the state to resume from
                save(ckpt_path, step, optimizer)  # the latest state, to resume from
            tqdm.write(f"step {step}: val {fmt(val_metrics)}{' (best)' if improved else ''}, lr {lr:.2e}")
            log.write(json.dumps({'step': step, **{f'val/{k}': v for k, v in val_metrics.items()}}) + '\n')
    if step == max_steps:
        break

    for group in optimizer.param_groups:
        group['lr'] = lr
    # this process's share of the global batch of pairs, split into micro-batches
    idx = batch_indices(len(train), batch_size, step, seed, rank, world_size)
    sums = torch.zeros(len(METRICS), device=device, dtype=torch.float64)
    for k in range(0, len(idx), micro_batch_size):
        indices = idx[k:k + micro_batch_size]
        batch = [train[j] for j in indices]
        if ddp:  # sync gradients only on the last micro-batch
            train_model.require_backward_grad_sync = k + micro_batch_size >= len(idx)
        (chosen, rejected), (ref_chosen, ref_rejected) = pair_logps(train_model, batch, indices, ref_train)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing)
        # the micro-batch's share of the global batch mean: the pieces add up to L of the batch;
        # DDP averages gradients over processes, hence * world_size
        (losses.sum() / batch_size * world_size).backward()
        sums += pair_stats(losses, chosen_rewards, rejected_rewards, chosen, rejected)
        tokens_seen += sum(2 * len(p) + len(c) + len(r) for p, c, r in batch)  # real tokens, pads not counted
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    train_metrics = means(sums)
    if not check_finite(train_metrics['loss'], grad_norm, f'step {step}', ckpt_path, skip_nonfinite):
        optimizer.zero_grad(set_to_none=True)
        continue
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if master:
        bar.set_postfix(loss=f"{train_metrics['loss']:.4f}", acc=f"{train_metrics['rewards/accuracies']:.3f}", lr=f"{lr:.2e}")
        log.write(json.dumps({'step': step, **{f'train/{k}': v for k, v in train_metrics.items()}, 'lr': lr,
                              'grad_norm': grad_norm.item()}) + '\n')
        log.flush()  # whole lines only: a run killed at any moment leaves a log that a resume can append to

if master:
    dt = time.time() - t0
    print(f"done: {max_steps} steps, final train loss {train_metrics.get('loss', float('nan')):.4f}, "
          f"train accuracy {train_metrics.get('rewards/accuracies', float('nan')):.3f}, best val loss {best_val:.4f}, "
          f"last val accuracy {val_metrics.get('rewards/accuracies', float('nan')):.3f}, "
          f"{dt:.0f} s ({tokens_seen * world_size / max(dt, 1e-9):.0f} tokens/s); best weights in {best_path}")
    log.close()
if ddp:
    end_ddp()  # all ranks done, then out of the process group and the process
