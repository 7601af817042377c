"""Evaluate a model offline and write a Hub-ready folder whose card carries the measured numbers.

    python examples/evaluate_and_write_card.py --model smollm2-135m --output out/smollm2-eval
"""

import argparse
import logging

from hf_compress.assets import load_model
from hf_compress.evaluation.suite import EvaluationSettings, run_evaluation
from hf_compress.hub import build_model_card, write_model_card


parser = argparse.ArgumentParser()
parser.add_argument("--model", default="tiny-llama")
parser.add_argument("--output", default="out/eval-card")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)

model, tokenizer = load_model(args.model)
settings = EvaluationSettings(max_windows=16, zero_shot_tasks=("arc_easy",), zero_shot_limit=100)
results, records = run_evaluation(model, tokenizer, settings)
model.save_pretrained(args.output)
tokenizer.save_pretrained(args.output)
card = build_model_card(base_model=getattr(model.config, "_name_or_path", None) or None,
                        model_name=f"{args.model}-evaluated", recipe={"method": "none"}, metrics=records)
write_model_card(args.output, card)
print(card.content[:1500])
