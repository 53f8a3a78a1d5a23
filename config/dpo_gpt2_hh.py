# DPO of the GPT-2 (124M) SFT model on Anthropic HH-RLHF, one CUDA GPU:
#   python train_sft.py config/sft_gpt2_hh.py
#   python train_dpo.py config/dpo_gpt2_hh.py
# The settings of the DPO paper's HH experiment: beta 0.1, learning rate 1e-6, batch 64 pairs,
# 150 warmup steps, then constant, as its code (the paper uses RMSprop; this is AdamW).
# Memory (an estimate from the parameter count and the activations, not measured: no GPU was
# available when this was written): the policy's fp32 weights, gradients and AdamW state
# 4 x 0.5 GB = 2 GB and the reference's weights 0.5 GB; bf16 activations of 8 pairs = 16 x 512
# tokens through 12 layers, about 0.4 MB a token = 3.5 GB; the fused head's (response tokens x
# 50257) bf16 logits, at most 0.8 GB: about 7 GB, so a 16 GB card is comfortable.
# precompute_ref_logps=True frees the reference's 0.5 GB (and its forward pass every step).
out_dir = 'out/dpo_hh'
sft_ckpt = 'out/sft_hh/best.pt'
train_file = 'data/hh_rlhf/prefs_train.jsonl'
val_file = 'data/hh_rlhf/prefs_test.jsonl'    # HH-RLHF has no validation split: its test split stands in
block_size = 512
beta = 0.1
loss_type = 'sigmoid'
batch_size = 64
micro_batch_size = 8
max_steps = 0                   # one epoch of the ~160k pairs (~2500 steps)
learning_rate = 1e-6
warmup_steps = 150
min_lr_ratio = 1.0              # no decay after the warmup
weight_decay = 0.0
eval_interval = 250
eval_batches = 4                # 256 pairs per eval
compile = True
