"""Evaluate a model offline and write a Hub-ready folder whose card carries the measured numbers.

    python examples/evaluate_and_write_card.py --model smollm2-135m --output out/smollm2-eval
"""

import argparse
import logging

from hf_compress.assets import load_model
from hf_compress.evaluation.suite import EvaluationSettings, run_evaluation
from hf_compress.hub import base_model_of, base_weights_of, build_model_card, write_model_card


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
# base_model_of: the Hub id the model came from (never a local path); base_weights_of: where a reference model's
# weights really came from (a de-quantized GGUF), which the card states.
card = build_model_card(base_model=base_model_of(model.config), model_name=f"{args.model}-evaluated",
                        recipe={"method": "none"}, metrics=records, base_weights=base_weights_of(model.config))
write_model_card(args.output, card)
print(card.content[:1500])
