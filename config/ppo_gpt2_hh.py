# PPO on Anthropic HH-RLHF with GPT-2 (124M), one CUDA GPU:
#   python data/hh_rlhf/prepare.py
#   python train_sft.py config/sft_gpt2_hh.py
#   python train_reward_model.py config/rm_gpt2_hh.py
#   python train_ppo.py config/ppo_gpt2_hh.py
# Memory (an estimate, not measured: no GPU was available when this was written): four 124M
# models in fp32 weights (2.0 GB), AdamW state and gradients for policy + value (3.0 GB), bf16
# activations of 8 x 384 tokens with gradients through two models (~3 GB), the KV cache of a
# 64 x 384 rollout (0.9 GB in bf16): about 9 GB, so a 16 GB card is comfortable, 24 GB leaves room for
# micro_batch_size=16. PPO-ptx (--ptx_coef > 0) adds a policy pass over 8 demonstrations of up to 512 tokens
# (the SFT run's block_size) after the PPO pass's backward, so its activations (~2 GB, an estimate) do not add to those.
out_dir = 'out/ppo_hh'
sft_ckpt = 'out/sft_hh/best.pt'
rm_ckpt = 'out/rm_hh/best.pt'
prompt_file = 'data/hh_rlhf/rl_prompts.jsonl'
ptx_file = 'data/hh_rlhf/sft_train.jsonl'  # PPO-ptx's demonstrations (with --ptx_coef > 0): the SFT stage's
gold_judge = ''                 # no gold judge for real data
batch_size = 64
max_prompt_len = 256
max_new_tokens = 128
temperature = 0.7
kl_coef = 0.05
mini_batch_size = 16
micro_batch_size = 8
ppo_epochs = 4
learning_rate = 3e-6
max_iters = 500
ckpt_interval = 50
sample_interval = 25
