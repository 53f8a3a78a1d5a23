"""
Export a language-model checkpoint (sft, ppo or dpo) as a Hugging Face GPT-2 directory, to use the
trained model elsewhere: config.json, model.safetensors (the weights, GPT-2's names and layout) and
the tokenizer's vocab.json and merges.txt (the model's own vocabulary: GPT-2's, or its first
vocab_size - 1 tokens plus <|endoftext|> at vocab_size - 1). No extra dependency: the safetensors
file is written by hand, the inverse of model.load_safetensors.

    python export.py --ckpt=out/dpo/best.pt --out_dir=out/dpo_hf
    python export.py --ckpt=out/ppo_hh/ckpt.pt --out_dir=out/ppo_hh_hf

Then, with transformers installed (it is not needed here):
    AutoModelForCausalLM.from_pretrained('out/dpo_hf'), AutoTokenizer.from_pretrained('out/dpo_hf')
Prompt it in the chat template it was trained with: "\\n\\nHuman: {question}\\n\\nAssistant:".
GPT.from_pretrained('out/dpo_hf') (init_from=out/dpo_hf) loads it back, as it loads GPT-2.
"""
import json
import os
import struct

from common import BPE_PATH as _BPE_PATH, gpt2_byte_decoder, gpt2_byte_order, require_checkpoint
from configurator import check, configure
from model import GPT2_ARCHITECTURE, GPT2_CONV1D

# -----------------------------------------------------------------------------
# default config values
ckpt = 'out/dpo/best.pt'      # the checkpoint to export (stage sft, ppo or dpo)
out_dir = 'out/dpo_hf'        # the Hugging Face directory to write
# -----------------------------------------------------------------------------
configure(globals())

checkpoint = require_checkpoint(ckpt, stage=('sft', 'ppo', 'dpo'),
                                hint='train that stage first (see README); a reward model has no GPT-2 form to export')
args = checkpoint['model_args']


def save_safetensors(tensors, path):
    """An 8-byte little-endian header length, a JSON header (padded with spaces to 8 bytes), the raw bytes."""
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, t in tensors.items():
        header[name] = {'dtype': 'F32', 'shape': list(t.shape), 'data_offsets': [offset, offset + t.numel() * 4]}
        offset += t.numel() * 4
    head = json.dumps(header, separators=(',', ':')).encode()
    head += b' ' * (-len(head) % 8)
    with open(path + '.tmp', 'wb') as f:
        f.write(struct.pack('<Q', len(head)) + head)
        for t in tensors.values():
            f.write(t.contiguous().numpy().tobytes())
    os.replace(path + '.tmp', path)


# the weights: ours are GPT-2's, but for Conv1D (a Linear with its weight transposed) and the tied head,
# which Hugging Face leaves out of the file and ties again on loading
weights = {k: (v.t() if k.endswith(GPT2_CONV1D) else v).float() for k, v in checkpoint['model'].items()
           if k != 'lm_head.weight'}
check(all(k.startswith('transformer.') for k in weights), f"{ckpt}: unexpected weights {sorted(weights)[:3]}")

# the tokenizer: GPT-2's byte-level BPE cut to the model's vocabulary, as common.get_tokenizer cuts it
# (vocab.json writes each token as GPT-2 does: every byte as a visible character)
V = args['vocab_size']
to_char = {b: c for c, b in gpt2_byte_decoder().items()}
vocab = {to_char[b]: i for i, b in enumerate(gpt2_byte_order())}  # ids 0-255: the bytes
with open(_BPE_PATH, encoding='utf-8') as f:
    merges = [line for line in f.read().split('\n')[1:] if line][:V - 1 - 256]  # the first line is '#version: 0.2'
for m in merges:  # each merge makes the next id: the two halves joined
    vocab[m.replace(' ', '')] = len(vocab)
vocab['<|endoftext|>'] = V - 1
check(len(vocab) == V, f"the tokenizer has {len(vocab)} tokens, the model {V}")

# a directory of the export's files only: transformers would read any other (tokenizer.json, say) over them
written = ('config.json', 'model.safetensors', 'vocab.json', 'merges.txt', 'tokenizer_config.json')
check(not os.path.exists(out_dir) or os.path.isdir(out_dir), f"out_dir {out_dir!r} is a file: export into a new or empty directory")
others = sorted(set(os.listdir(out_dir)) - set(written)) if os.path.isdir(out_dir) else []
check(not others, f"{out_dir} holds other files ({', '.join(others[:4])}): export into a new or empty directory")

config = dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=V, n_positions=args['block_size'],
              n_ctx=args['block_size'], n_embd=args['n_embd'], n_layer=args['n_layer'], n_head=args['n_head'],
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=V - 1, eos_token_id=V - 1,
              **GPT2_ARCHITECTURE)
os.makedirs(out_dir, exist_ok=True)
save_safetensors(weights, os.path.join(out_dir, 'model.safetensors'))
with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
with open(os.path.join(out_dir, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump(vocab, f, ensure_ascii=False)
with open(os.path.join(out_dir, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(m + '\n' for m in merges))
with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'GPT2Tokenizer', 'model_max_length': args['block_size'], 'bos_token': '<|endoftext|>',
               'eos_token': '<|endoftext|>', 'unk_token': '<|endoftext|>', 'add_prefix_space': False}, f, indent=2)
n = sum(t.numel() for t in weights.values())
print(f"wrote {out_dir}: {checkpoint.get('stage')} step {checkpoint.get('step')}, {n / 1e6:.2f}M parameters, "
      f"vocabulary {V} (<|endoftext|> = {V - 1}), context {args['block_size']}")
