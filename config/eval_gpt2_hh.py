# Evaluate the GPT-2 (124M) HH-RLHF runs on held-out prompts of HH-RLHF's test split, one CUDA GPU:
#   python eval.py config/eval_gpt2_hh.py
# after the four training presets. Real data has no gold judge: the learned reward model scores every
# answer (rm) and the answer against the SFT model's to the same prompt (rm_win). It is the reward PPO
# maximised, so PPO's numbers are a proxy that PPO can overfit; read them beside kl and the samples.
# The crowd row: the reward model on the chosen replies to the same prompts, the data's own answers,
# cut as a model's answer is (max_new_tokens). HH-RLHF has no validation split, so the training
# presets validate on these test splits: the prompts are held out from training, not from the choice
# of best.pt.
ckpts = 'out/sft_hh/best.pt,out/ppo_hh/ckpt.pt,out/dpo_hh/best.pt'
baseline = 'out/sft_hh/best.pt'
rm_ckpt = 'out/rm_hh/best.pt'
gold_judge = ''                 # no gold judge for real data
prompt_file = 'data/hh_rlhf/sft_test.jsonl'   # the test split's prompts (their chosen replies are not shown to the models)
crowd_file = 'data/hh_rlhf/sft_test.jsonl'
n_prompts = 500                 # spread over the test split
max_prompt_len = 256            # PPO's: the end of a longer conversation
max_new_tokens = 128
temperature = 0.7
batch_size = 100
out_json = 'out/eval_hh.json'
