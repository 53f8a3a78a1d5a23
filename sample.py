"""
Chat with a checkpoint of any stage that has a language model (sft, ppo, dpo), in the chat template
the models were trained with (common.encode_prompt / decode_response).

    python sample.py --ckpt=out/ppo/ckpt.pt --prompt="What is the capital of France?"
    python sample.py --ckpt=out/dpo/best.pt --num_samples=4 --temperature=1.0
    python sample.py --ckpt=out/sft/best.pt --prompt_file=questions.txt   # one question per line
    python sample.py --ckpt=out/sft/best.pt --prompt_file=data/tinyhh/eval_prompts.jsonl   # each line's "prompt"
    python sample.py --ckpt=out/sft/best.pt                                # interactive: a question per line, 'quit' or EOF ends
    python sample.py --ckpt=out/dpo_hh/best.pt --chat=True --judge=False   # a conversation: each question follows the earlier turns

Each answer says whether it ended with <|endoftext|> or ran out of tokens, and (unless --judge=False),
with the built-in world importable, the gold judge's score in [-1, 1] (meaningful for tinyhh questions only;
with --chat, for a conversation's first question only: the judge reads one question, not the earlier turns).
With --rm_ckpt, a learned reward model's score too (on real data, the only judge there is):

    python sample.py --ckpt=out/ppo_hh/ckpt.pt --rm_ckpt=out/rm_hh/best.pt --judge=False --num_samples=4
"""
import os
import sys

import torch

from common import decode_response, default_device, default_dtype, encode_prompt, get_tokenizer, \
    model_from_checkpoint, render_prompt, render_response, require_checkpoint, require_reward_model, setup
from configurator import check, configure
from loaders import read_jsonl

# -----------------------------------------------------------------------------
# default config values
ckpt = 'out/ppo/ckpt.pt'      # the checkpoint to chat with (stage sft, ppo or dpo)
prompt = ''                   # one question to answer ('' and no prompt_file: interactive loop)
prompt_file = ''              # a text file: answer each non-empty line (a .jsonl file: each line's "prompt")
num_samples = 1               # answers per question
chat = False                  # each question follows the conversation so far, the first answer its reply ('reset': start over)
max_new_tokens = 64           # response tokens at most
temperature = 0.7             # 0: greedy decoding
top_k = 0                     # sample from the k most likely tokens only (0: off)
top_p = 1.0                   # sample from the smallest set of tokens with this much probability (1.0: off)
seed = 1337                   # seeds the sampling: the same settings give the same answers
judge = True                  # print the built-in world's gold score next to each answer
rm_ckpt = ''                  # a reward model (train_reward_model.py's best.pt): print its score too ('' = no)
device = default_device()     # 'cpu' | 'cuda' | 'cuda:1' ...
dtype = default_dtype()       # 'float32' | 'bfloat16' | 'float16'
# -----------------------------------------------------------------------------
configure(globals())
check(temperature >= 0 and top_k >= 0 and 0 < top_p <= 1, "need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
check(num_samples > 0 and max_new_tokens > 0, "need num_samples > 0 and max_new_tokens > 0")
check(not (prompt and prompt_file), "give --prompt or --prompt_file, not both")
check(not prompt_file or os.path.isfile(prompt_file), f"prompt_file {prompt_file!r} not found")

checkpoint = require_checkpoint(ckpt, stage=None, hint='train that stage first (see README)')
stage = checkpoint.get('stage')
check(stage != 'rm' and not checkpoint['model_args'].get('scalar_head'),
      f"{ckpt} is a reward model (stage {stage!r}): it scores a response with one number and has no "
      f"language model to sample from; chat with an sft, ppo or dpo checkpoint instead")
block_size, step = checkpoint['model_args']['block_size'], checkpoint.get('step')
_, _, _, device, ctx = setup(device, dtype, seed, training=False)
model, model_args = model_from_checkpoint(checkpoint)
model.to(device).eval()
del checkpoint
enc = get_tokenizer(model_args['vocab_size'])
generator = torch.Generator(device=device).manual_seed(seed)

reward_model = None
if rm_ckpt:
    rm = require_reward_model(rm_ckpt, hint='train it first: python train_reward_model.py (see README)')
    check(rm['model_args']['vocab_size'] == model_args['vocab_size'], f"{rm_ckpt} and {ckpt} use different vocabularies")
    check(rm['model_args']['block_size'] >= block_size, f"{rm_ckpt} reads at most {rm['model_args']['block_size']} tokens, "
          f"fewer than {ckpt}'s block_size {block_size}")
    reward_model = model_from_checkpoint(rm)[0].to(device).eval()
    del rm
gold = None
if judge:
    try:
        from data.tinyhh.world import score as gold
    except ImportError:
        print("(the built-in world's judge is not importable: no gold scores)")
print(f"{ckpt}: stage {stage!r}, step {step}, {model.get_num_params() / 1e6:.2f}M parameters, on {device}")


# prompt and response must fit the context: the response gets room for at least min(max_new_tokens, block_size / 2)
# tokens (a longer prompt keeps its end), and at most max_new_tokens
keep = block_size - min(max_new_tokens, block_size // 2)


def answer(question, history=''):
    """Sample num_samples responses to one question, asked after history (earlier turns in HH-RLHF's format), and
    print them, each with how it ended; returns the first one's text."""
    tokens = encode_prompt(enc, history + render_prompt(question))
    if len(tokens) > keep:
        print(f"(prompt cut to its last {keep} of {len(tokens)} tokens)")
        tokens = tokens[-keep:]
    n_new = min(max_new_tokens, block_size - len(tokens))
    with torch.no_grad(), ctx:
        seq, _, _, response_mask = model.generate([tokens] * num_samples, n_new, enc.eot_token,
                                                  temperature, top_k or None, top_p, generator=generator)
    P = seq.size(1) - response_mask.size(1)  # prompt positions (the same prompt in every row: no padding)
    texts = []
    for i in range(num_samples):
        response = seq[i, P:P + int(response_mask[i].sum())].tolist()  # (n,) up to and with the eos
        ended = response[-1] == enc.eot_token
        text = decode_response(enc, response)
        texts.append(text)
        note = 'ended with <|endoftext|>' if ended else f'ran out of tokens ({n_new} at most)'
        note += f", {len(response)} token{'s' if len(response) > 1 else ''}"
        if gold is not None and not history:  # the gold judge reads one question: a follow-up's score would mislead
            note += f", gold {gold(question, text, ended):+.2f}"
        if reward_model is not None:  # its score at the answer's last token
            with torch.no_grad(), ctx:
                note += f", reward {reward_model(seq[i:i + 1, :P + len(response)])[0][0, -1].item():+.2f}"
        head = f"[{i + 1}/{num_samples}] " if num_samples > 1 else ''
        print(f"Assistant: {head}{text}\n  ({note})")
    return texts[0]


turns = []  # with chat: the conversation so far, a (question, answer) turn each


def ask(question):
    """Answer a question; with chat, after the earlier turns, and the first answer becomes the next turn."""
    if chat and question.lower() == 'reset':
        turns.clear()
        print('(a new conversation)')
        return
    # a conversation longer than the context drops its oldest turns, so that the prompt starts at a Human turn
    dropped = 0
    while turns and len(encode_prompt(enc, ''.join(turns) + render_prompt(question))) > keep:
        turns.pop(0)
        dropped += 1
    if dropped:
        print(f"(the oldest {dropped} turn{'s' if dropped > 1 else ''} dropped: the conversation outgrew the context)")
    reply = answer(question, ''.join(turns))
    if chat:
        turns.append(render_prompt(question) + render_response(reply))


if prompt:
    questions = [prompt]
elif prompt_file.endswith('.jsonl'):  # the RL-prompt schema, {"prompt": str} a line, as eval.py and PPO read
    questions = [r['prompt'] for r in read_jsonl(prompt_file, 'rl')]
elif prompt_file:
    questions = []
    with open(prompt_file, 'rb') as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line = line.decode('utf-8')
            except UnicodeDecodeError as e:
                check(False, f"{prompt_file}:{lineno}: invalid UTF-8 at byte {e.start}")
            if line.strip():
                questions.append(line.strip())
else:
    questions = None  # interactive

if questions is not None:
    for q in questions:
        print(f"\nHuman: {q}")
        ask(q)
else:
    print("interactive: type a question and press enter; " + ("'reset' starts a new conversation; " if chat else '')
          + "'quit' or Ctrl-D to end")
    while True:
        try:
            q = input('\nHuman: ').strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not sys.stdin.isatty():  # piped in: show the question, as a terminal would
            print(q)
        if q.lower() in ('quit', 'exit'):
            break
        if q:
            ask(q)
