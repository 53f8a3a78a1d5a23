"""
Supervised fine-tuning (SFT): teach the model to answer like the demonstrations.

    L_SFT(theta) = - (1 / N) * sum_{(x, y) in batch} sum_t log pi_theta(y_t | x, y_<t)

summed over response tokens y_t only (N = response tokens in the batch): the prompt x conditions
the model but its targets are -1, so it is never learned. Every response ends with
<|endoftext|> (unless truncation to block_size cut it off), which is a target too: a model that
never learns to stop is a classic bug.

    python train_sft.py                              # built-in world, tiny model from scratch, CPU
    python train_sft.py --max_steps=200              # any default below can be overridden
    python train_sft.py config/sft_gpt2_hh.py        # GPT-2 on Anthropic HH-RLHF, one GPU
    torchrun --standalone --nproc_per_node=8 train_sft.py config/sft_gpt2_hh.py --micro_batch_size=8   # 64 = 8 x 8
"""
import json
import math
import os
import time

import torch
from tqdm import tqdm

from common import (all_reduce_mean, check_finite, default_compile, default_device, default_dtype, end_ddp, get_lr,
                    get_tokenizer, in_one_process, model_from_checkpoint, open_log, require_checkpoint, restore_rng,
                    save_checkpoint, setup, wrap_for_training)
from configurator import UserError, check, configure
from loaders import batch_indices, collate, read_jsonl, tokenize_sft
from model import GPT, GPTConfig, HF_REPOS, DownloadError, download_gpt2

# -----------------------------------------------------------------------------
# the loss: a pure function (checked against a hand computation in tests/)


def sft_loss(logprobs, targets, n_tokens):
    """L_SFT: minus the log-likelihood of the response tokens (targets >= 0), divided by the number
    of response tokens in the whole batch, so micro-batches and processes add up to the batch mean
    (the mean NLL the model returns beside the log-probs is one micro-batch's, hence not used here)."""
    return -(logprobs * (targets >= 0)).sum() / n_tokens

# -----------------------------------------------------------------------------
# default config values: the built-in world (data/tinyhh), a tiny model from scratch, on a CPU
out_dir = 'out/sft'                           # checkpoints: ckpt.pt (latest, to resume) and best.pt (best val loss)
train_file = 'data/tinyhh/sft_train.jsonl'    # {"prompt", "response"} per line
val_file = 'data/tinyhh/sft_val.jsonl'        # held-out demonstrations for the validation loss
train_subset = 0                              # use only the first N training examples (0: all; 64: an overfit check)
init_from = 'scratch'                         # 'scratch' | 'resume' | 'gpt2' | 'gpt2-medium' | ... | a local HF directory
# model (used with init_from='scratch')
n_layer = 4                                   # transformer blocks
n_head = 4                                    # attention heads
n_embd = 128                                  # width
block_size = 128                              # context length: prompt + response tokens
vocab_size = 8192                             # GPT-2's first N-1 BPE ranks and <|endoftext|> (50257: all of GPT-2's)
dropout = 0.0                                 # dropout in the model
# optimization
batch_size = 32                               # sequences per optimizer step, summed over all processes
micro_batch_size = 32                         # sequences per forward pass per process (gradient accumulation)
max_steps = 1200                              # optimizer steps
learning_rate = 2e-3                          # peak learning rate
min_lr_ratio = 0.1                            # final learning rate as a fraction of the peak
warmup_steps = 50                             # linear warmup steps
weight_decay = 0.1                            # AdamW weight decay, on matrices only
beta1 = 0.9                                   # AdamW beta1
beta2 = 0.95                                  # AdamW beta2
grad_clip = 1.0                               # clip the gradient norm at this value (0: off)
skip_nonfinite = False                        # on a NaN/inf loss or gradient: skip the step (True) or stop (False)
# evaluation, logging, checkpoints
eval_interval = 200                           # steps between validation evals (and checkpoints)
eval_batches = 8                              # validation eval: the first eval_batches x batch_size examples (0: all of val_file)
seed = 1337                                   # seeds the data order and the initialisation
# system
device = default_device()                     # 'cpu' | 'cuda' | 'cuda:1' ...
dtype = default_dtype()                       # 'float32' | 'bfloat16' (float16 would need loss scaling)
compile = default_compile()                   # torch.compile the training passes (evaluation runs eager): on by default on CUDA, off on a CPU
tf32 = True                                   # CUDA: TF32 matmuls for the float32 work (False: exact float32)
flash_attention = True                        # CUDA: allow the flash kernel in scaled_dot_product_attention
fused_adamw = True                            # AdamW as one fused kernel (False: torch's per-tensor loop; same math)
pin_memory = True                             # CUDA: batches copied from pinned host memory, without waiting
grad_checkpoint = False                       # recompute activations in the backward pass: less memory (gpt2-large/xl), ~1/3 slower
# -----------------------------------------------------------------------------
config = configure(globals())
check(batch_size > 0 and micro_batch_size > 0 and max_steps > 0, "batch_size, micro_batch_size and max_steps must be > 0")
check(learning_rate > 0 and 0 <= min_lr_ratio <= 1 and grad_clip >= 0 and 0 <= dropout < 1,
      "need learning_rate > 0, 0 <= min_lr_ratio <= 1, grad_clip >= 0, 0 <= dropout < 1")
check(eval_interval > 0 and eval_batches >= 0 and warmup_steps >= 0, "need eval_interval > 0, eval_batches >= 0, warmup_steps >= 0")
check(init_from in ('scratch', 'resume') or init_from in HF_REPOS or os.path.isdir(init_from),
      f"init_from must be 'scratch', 'resume', one of {', '.join(HF_REPOS)} or a directory with GPT-2 weights, got {init_from!r}")
check(block_size >= 2 and 257 <= vocab_size <= 50257, "need block_size >= 2 and vocab_size in [257, 50257] (GPT-2's BPE)")
check(n_layer > 0 and n_head > 0 and n_embd > 0 and n_embd % n_head == 0,
      f"need n_layer, n_head, n_embd > 0 and n_embd divisible by n_head, got {n_layer}, {n_head}, {n_embd}")
check(train_subset >= 0 and weight_decay >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1,
      "need train_subset >= 0 (0: all), weight_decay >= 0, 0 <= beta1, beta2 < 1")

# -----------------------------------------------------------------------------
# set-up: processes, device, precision
ddp, rank, world_size, device, ctx = setup(device, dtype, seed, tf32=tf32, flash_attention=flash_attention)
master = rank == 0
check(batch_size % (micro_batch_size * world_size) == 0,
      f"batch_size {batch_size} must be divisible by micro_batch_size {micro_batch_size} x {world_size} processes")
grad_accum = batch_size // (micro_batch_size * world_size)

train_records, val_records = read_jsonl(train_file, 'sft'), read_jsonl(val_file, 'sft')  # a bad file stops us before a GPT-2 download

# -----------------------------------------------------------------------------
# the model: from scratch, from GPT-2, or resumed
start_step, best_val, ckpt_path = 0, float('inf'), os.path.join(out_dir, 'ckpt.pt')
if init_from == 'resume':
    ckpt = require_checkpoint(ckpt_path, stage='sft', hint=f"nothing to resume in {out_dir}", resume_config=config)
    model, model_args = model_from_checkpoint(ckpt, dropout=dropout)
    start_step, best_val = ckpt['step'], ckpt['best_val']
elif init_from == 'scratch':
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      vocab_size=vocab_size, dropout=dropout, bias=True)
    model = GPT(GPTConfig(**model_args))
else:  # GPT-2: one download per machine (local rank 0), then every process loads it
    def fetch_gpt2():
        try:
            download_gpt2(init_from)
        except DownloadError as e:  # offline: one line saying where to put the files, not a traceback
            raise UserError(str(e)) from None
    in_one_process(fetch_gpt2, int(os.environ.get('LOCAL_RANK', 0)) == 0 and not os.path.isdir(init_from), ddp, device,
                   f"{init_from}: the download")
    model = GPT.from_pretrained(init_from, dropout=dropout)
    model_args = {k: getattr(model.config, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'dropout', 'bias')}
check(model_args['block_size'] >= block_size, f"block_size {block_size} > the model's {model_args['block_size']}")
model.to(device)
enc = get_tokenizer(model_args['vocab_size'])
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), fused_adamw)
if init_from == 'resume':
    optimizer.load_state_dict(ckpt['optimizer'])
    restore_rng(ckpt)
    del ckpt
# resumed or from GPT-2, the shape comes from the checkpoint, not from n_layer etc.: the config records the one built
shape = {k: model_args[k] for k in ('n_layer', 'n_head', 'n_embd', 'vocab_size')}
config.update(shape)
if master:
    shape = ', '.join(f"{k} {v}" for k, v in shape.items())
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters ({shape}){'' if init_from == 'scratch' else ', from ' + init_from}")
train_model = wrap_for_training(model, compile, ddp, device, grad_checkpoint)  # compiled and/or DDP; model stays the plain GPT

# -----------------------------------------------------------------------------
# data: (prompt ids, response ids) pairs; the batch masks everything but the response
train = tokenize_sft(train_records, enc, block_size, train_file)
val = tokenize_sft(val_records, enc, block_size, val_file)
del train_records, val_records
if train_subset:
    check(train_subset <= len(train), f"{train_file}: {len(train)} examples, fewer than train_subset {train_subset}")
    train = train[:train_subset]
check(len(train) >= batch_size, f"{train_file}: {len(train)} examples, fewer than one batch of {batch_size}")
if master:
    print(f"data: {len(train)} train and {len(val)} val demonstrations; {grad_accum} micro-batches of "
          f"{micro_batch_size} x {world_size} processes per step")


@torch.no_grad()
def evaluate():
    """Mean per-token validation loss over the first eval_batches x batch_size examples of val (0: all of
    it): the same examples however many processes share them."""
    model.eval()
    # summed in float64: a float32 count is exact only up to 2**24 (16.8M) tokens
    total, count = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device, dtype=torch.float64)
    stop = len(val) if eval_batches == 0 else min(len(val), eval_batches * batch_size)
    for i in range(rank * micro_batch_size, stop, micro_batch_size * world_size):
        seq, targets, _ = collate(val[i:min(i + micro_batch_size, stop)], enc.eot_token, device, pin_memory)
        with ctx:
            logprobs, _ = model(seq[:, :-1], targets)
        total -= logprobs.sum().double()  # logprobs are float32, under autocast too
        count += (targets >= 0).sum()
    model.train()
    return (all_reduce_mean(total, ddp) / all_reduce_mean(count, ddp)).item()


def save(step, best):
    save_checkpoint(ckpt_path, model, optimizer, model_args, config, 'sft', step, best_val=best)


# -----------------------------------------------------------------------------
# training loop
log = open_log(out_dir, start_step, master, ddp, device)  # out_dir/log.jsonl: one JSON row per step, by rank 0
model.train()
t0, tokens_seen, loss_value = time.time(), 0, float('nan')
# steps run 0 .. max_steps - 1; the extra pass at step == max_steps evaluates and saves the final weights
bar = tqdm(range(start_step, max_steps + 1), initial=start_step, total=max_steps, disable=not master, desc='sft', mininterval=1.0)
for step in bar:
    # dropout masks from (seed, step, rank): a resume under DDP is exact too (100_003: more than
    # any rank count, so no two (step, rank) share a seed)
    torch.manual_seed(seed + 100_003 * step + rank)
    lr = get_lr(step, learning_rate, warmup_steps, max_steps, min_lr_ratio)
    if step % eval_interval == 0 or step == max_steps:
        val_loss = evaluate()
        if master:
            improved = val_loss < best_val
            best_val = min(best_val, val_loss)
            if improved:  # best.pt first: a kill between the two saves resumes before this step and redoes both
                save_checkpoint(os.path.join(out_dir, 'best.pt'), model, None, model_args, config, 'sft', step, best_val=best_val)
            if math.isfinite(val_loss):  # weights that give a NaN/inf loss are never the state to resume from
                save(step, best_val)  # the latest state, to resume from
            tqdm.write(f"step {step}: val loss {val_loss:.4f}{' (best)' if improved else ''}, lr {lr:.2e}")
            log.write(json.dumps({'step': step, 'val/loss': val_loss}) + '\n')
    if step == max_steps:
        break

    for group in optimizer.param_groups:
        group['lr'] = lr
    # this process's share of the global batch, split into micro-batches
    idx = batch_indices(len(train), batch_size, step, seed, rank, world_size)
    micro = [collate([train[j] for j in idx[k:k + micro_batch_size]], enc.eot_token, device, pin_memory)
             for k in range(0, len(idx), micro_batch_size)]
    n_tokens = sum((targets >= 0).sum() for _, targets, _ in micro).float()
    n_tokens = all_reduce_mean(n_tokens, ddp) * world_size  # response tokens in the global batch
    loss_sum = torch.zeros((), device=device)
    for k, (seq, targets, _) in enumerate(micro):
        if ddp:  # sync gradients only on the last micro-batch
            train_model.require_backward_grad_sync = k == len(micro) - 1
        with ctx:
            logprobs, _ = train_model(seq[:, :-1], targets)
            loss = sft_loss(logprobs, targets, n_tokens)
        # DDP averages gradients over processes; the loss is already normalised by the global count
        (loss * world_size).backward()
        loss_sum += loss.detach()
    tokens_seen += sum(len(train[j][0]) + len(train[j][1]) for j in idx)  # real tokens, pads not counted
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    loss_value = all_reduce_mean(loss_sum, ddp).item() * world_size
    if not check_finite(loss_value, grad_norm, f'step {step}', ckpt_path, skip_nonfinite):
        optimizer.zero_grad(set_to_none=True)
        continue
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if master:
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        log.write(json.dumps({'step': step, 'train/loss': loss_value, 'lr': lr, 'grad_norm': grad_norm.item()}) + '\n')
        log.flush()  # whole lines only: a run killed at any moment leaves a log that a resume can append to

if master:
    dt = time.time() - t0
    print(f"done: {max_steps} steps, final train loss {loss_value:.4f}, best val loss {best_val:.4f}, "
          f"{dt:.0f} s ({tokens_seen * world_size / max(dt, 1e-9):.0f} tokens/s); best weights in {out_dir}/best.pt")
    log.close()
if ddp:
    end_ddp()  # all ranks done, then out of the process group and the process
