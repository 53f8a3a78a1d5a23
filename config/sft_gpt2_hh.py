# SFT of GPT-2 (124M) on Anthropic HH-RLHF (the chosen side of each pair), one CUDA GPU:
#   python data/hh_rlhf/prepare.py
#   python train_sft.py config/sft_gpt2_hh.py
# Memory (an estimate from the parameter count and the activations, not measured: no GPU was
# available when this was written): fp32 weights, gradients and AdamW state 4 x 0.5 GB = 2 GB;
# bf16 activations of 16 x 512 tokens through 12 layers, about 0.4 MB a token = 3.5 GB; the fused
# head's (response tokens x 50257) bf16 logits, at most 0.8 GB: about 6-7 GB, so a 16 GB card is
# comfortable and a 24 GB one takes micro_batch_size=32.
out_dir = 'out/sft_hh'
train_file = 'data/hh_rlhf/sft_train.jsonl'
val_file = 'data/hh_rlhf/sft_test.jsonl'  # HH-RLHF has no validation split: its test split stands in
init_from = 'gpt2'
block_size = 512
vocab_size = 50257
dropout = 0.0                   # off, so the RM, DPO and PPO stages start from the same function
batch_size = 64
micro_batch_size = 16
max_steps = 2500                # about one epoch of the ~160k demonstrations
learning_rate = 3e-5
warmup_steps = 100
weight_decay = 0.0
eval_interval = 250
eval_batches = 5                # 320 examples per eval
compile = True
