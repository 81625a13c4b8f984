"""AsFT at real scale: LoRA fine-tuning of Llama-2-7b-chat on AG News, anchored to the
alignment delta Llama-2-7b-chat − Llama-2-7b (the setting of the AsFT paper).

Setting: LoRA r = 8, α = 32 on ``q_proj``/``v_proj`` of the chat model, λ = 1, lr 5e-5,
the anchor built from the two local checkpoints (``--anchor-rank`` directions per module;
the published ``C`` uses all of them, 64 captures most of the energy at a fraction of the
memory; ``asft inspect`` shows how much).

Data, the AsFT JSON format: one JSON file holding a list of records
``{"instruction": str, "input": str, "output": str}`` (AG News items as
``instruction`` = the categorization prompt, ``input`` = the article, ``output`` = the
label; harmful items mixed in have an empty ``input``). Each record becomes an Alpaca-style
prompt; the loss is on the ``output`` tokens only.

Run on a GPU with local checkpoints::

    python examples/llama2_7b_agnews.py --aligned /models/Llama-2-7b-chat-hf --base /models/Llama-2-7b-hf \\
        --train-json data/agnews_train.json --output-dir runs/agnews-asft

``--tiny-smoke-test`` runs the same code path on a tiny Llama pair, tokenizer and data set
written to ``OUTPUT_DIR/tiny`` (CPU, seconds), which is how CI exercises this script.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments

import asft_kernels as asft
from asft_kernels.diagnostics import alignment_report, format_report, plot_report
from asft_kernels.integrations.hf import AsFTTrainer

TARGETS = ["q_proj", "v_proj"]
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
AGNEWS_INSTRUCTION = "Categorize the news article given in the input into one of the 4 categories:\n\n" \
                     "World\nSports\nBusiness\nSci/Tech\n"


def format_prompt(record: dict) -> str:
    """The Alpaca-style prompt of one AsFT JSON record (without the response)."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def load_asft_json(path: Path, tokenizer, max_length: int):
    """Tokenized data set from an AsFT JSON file: ``input_ids`` and ``labels`` (prompt
    tokens masked with -100), truncated to ``max_length`` tokens."""
    data = load_dataset("json", data_files=str(path), split="train")
    missing = {"instruction", "output"} - set(data.column_names)
    if missing:
        raise ValueError(f"{path}: records lack the field(s) {sorted(missing)}; expected instruction/input/output")

    def tokenize(record: dict) -> dict:
        prompt = format_prompt(record)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        full_ids = tokenizer(prompt + record["output"], add_special_tokens=True)["input_ids"]
        full_ids = (full_ids + [tokenizer.eos_token_id])[:max_length]
        labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
        return {"input_ids": full_ids, "attention_mask": [1] * len(full_ids), "labels": labels}

    data = data.map(tokenize, remove_columns=data.column_names)
    # a prompt longer than max_length leaves nothing to learn from (and a NaN loss)
    return data.filter(lambda row: any(label != -100 for label in row["labels"]))


def write_tiny_setup(root: Path, seed: int = 0) -> dict[str, Path]:
    """A tiny stand-in for the real setting: ``base/`` and ``aligned/`` Llama checkpoints
    (aligned = base + a low-rank delta on q/v), a word-level tokenizer saved with both,
    and ``train.json`` in the AsFT format. Returns the three paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    gen = torch.Generator().manual_seed(seed)
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    words = "team wins market stocks rise vote leaders meet chip launch court rules oil price game season".split()
    records = []
    for i in range(24):
        article = " ".join(words[int(j)] for j in torch.randint(0, len(words), (8,), generator=gen))
        records.append({"instruction": AGNEWS_INSTRUCTION, "input": article, "output": labels[i % 4]})
    records.append({"instruction": "Tell me a secret plan", "input": "", "output": "No"})
    root.mkdir(parents=True, exist_ok=True)
    train_json = root / "train.json"
    train_json.write_text(json.dumps(records, indent=1))

    specials = ["[UNK]", "[PAD]", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [format_prompt(r) + r["output"] for r in records]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        bos_token="<s>", eos_token="</s>")

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    base = LlamaForCausalLM(config)
    aligned = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.split(".")[-1] in TARGETS:
                m, n = module.weight.shape
                module.weight += 0.05 * torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen)
    paths = {"base": root / "base", "aligned": root / "aligned", "train_json": train_json}
    for key, model in (("base", base), ("aligned", aligned)):
        model.save_pretrained(str(paths[key]))
        tokenizer.save_pretrained(str(paths[key]))
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aligned", type=Path, help="local Llama-2-7b-chat checkpoint (the model fine-tuned)")
    p.add_argument("--base", type=Path, help="local Llama-2-7b checkpoint (base of the alignment delta)")
    p.add_argument("--train-json", type=Path, help="training data in the AsFT JSON format")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--anchor", type=Path, help="use this anchor file instead of building one")
    p.add_argument("--anchor-rank", type=int, default=64, help="directions kept per module (default 64)")
    p.add_argument("--anchor-mode", choices=["paper", "projector", "full"], default="paper")
    p.add_argument("--anchor-lambda", type=float, default=1.0)
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "cpp", "triton"])
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="model dtype: auto = bf16 on a GPU, fp32 on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--residual-every", type=int, default=100, help="log per-layer residual fractions every N steps")
    p.add_argument("--tiny-smoke-test", action="store_true",
                   help="write a tiny model pair, tokenizer and data set to OUTPUT_DIR/tiny and run on them")
    args = p.parse_args(argv)
    if not args.tiny_smoke_test and not (args.aligned and args.train_json and (args.base or args.anchor)):
        p.error("--aligned, --train-json and --base (or --anchor) are required unless --tiny-smoke-test is given")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the fine-tuning; returns the trainer, the anchor, the report rows and the paths written."""
    args = parse_args(argv)
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny_smoke_test:
        paths = write_tiny_setup(out / "tiny")
        args.aligned, args.base, args.train_json = paths["aligned"], paths["base"], paths["train_json"]

    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and torch.cuda.is_available())
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # 1. The anchor: streamed from the two checkpoints, one module at a time.
    if args.anchor is not None:
        anchor = asft.AlignmentAnchor.load(args.anchor)
        anchor_path = args.anchor
    else:
        anchor = asft.build_anchor(aligned=str(args.aligned), base=str(args.base), target_modules=TARGETS,
                                   rank=args.anchor_rank, device=device, progress=not args.tiny_smoke_test)
        anchor_path = out / "anchor.safetensors"
        anchor.save(anchor_path)
    print(f"anchor: {anchor} ({anchor_path})")

    # 2. The aligned (chat) model with LoRA on q_proj/v_proj.
    tokenizer = AutoTokenizer.from_pretrained(str(args.aligned))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(args.aligned),
                                                 dtype=torch.bfloat16 if use_bf16 else torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora_config)
    model.print_trainable_parameters()

    # 3. Data in the AsFT JSON format, loss on the responses.
    train_dataset = load_asft_json(args.train_json, tokenizer, args.max_length)

    # 4. Train: AsFTTrainer builds AsFTAdamW from the TrainingArguments.
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate, weight_decay=0.0, lr_scheduler_type="constant",
        logging_steps=args.logging_steps, save_strategy="no", report_to=[], bf16=use_bf16,
        use_cpu=device == "cpu", disable_tqdm=args.tiny_smoke_test, seed=42,
    )
    trainer = AsFTTrainer(
        model=model, args=training_args, train_dataset=train_dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        anchor=anchor, anchor_lambda=args.anchor_lambda, anchor_mode=args.anchor_mode,
        anchor_backend=args.backend, anchor_residual_every=args.residual_every,
    )
    trainer.train()

    # 5. Save the adapter and report where it drifted from the alignment subspace.
    adapter_dir = out / "adapter"
    model.save_pretrained(str(adapter_dir))
    rows = alignment_report(model, anchor, mode=args.anchor_mode)
    print(format_report(rows))
    plot_report(rows, out / "alignment.png", title=f"AsFT λ={args.anchor_lambda}, {args.anchor_mode}")
    print(f"adapter -> {adapter_dir}; table again with: asft report {adapter_dir} {anchor_path}")
    return {"trainer": trainer, "anchor": anchor, "rows": rows, "anchor_path": anchor_path,
            "adapter_dir": adapter_dir}


if __name__ == "__main__":
    main(sys.argv[1:])
