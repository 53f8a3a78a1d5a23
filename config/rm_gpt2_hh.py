# Bradley-Terry reward model from the GPT-2 (124M) SFT model on Anthropic HH-RLHF, one CUDA GPU:
#   python train_sft.py config/sft_gpt2_hh.py
#   python train_reward_model.py config/rm_gpt2_hh.py
# Memory (an estimate from the parameter count and the activations, not measured: no GPU was
# available when this was written): fp32 weights, gradients and AdamW state 4 x 0.5 GB = 2 GB;
# bf16 activations of 8 pairs = 16 x 512 tokens through 12 layers, about 0.4 MB a token = 3.5 GB;
# no vocabulary-sized tensor (the scalar head replaces the LM head): about 6 GB, so a 16 GB card
# is comfortable and a 24 GB one takes micro_batch_size=16.
out_dir = 'out/rm_hh'
sft_ckpt = 'out/sft_hh/best.pt'
train_file = 'data/hh_rlhf/prefs_train.jsonl'
val_file = 'data/hh_rlhf/prefs_test.jsonl'    # HH-RLHF has no validation split: its test split stands in
test_file = ''                                 # ... so there is no separate test set
sft_train_file = 'data/hh_rlhf/sft_train.jsonl'
norm_examples = 2048
block_size = 512
batch_size = 64
micro_batch_size = 8
max_steps = 0                   # one epoch of the ~160k pairs (~2500 steps): a second one overfits
learning_rate = 1e-5
warmup_steps = 100
weight_decay = 0.0
eval_interval = 250
eval_batches = 4                # 256 pairs per eval; the full test split is scored at the end
compile = True
