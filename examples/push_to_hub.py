"""Push an hf_compress artifact folder (weights + model card) to the Hub, then load it back.

Needs a Hub token (`hf auth login` or HF_TOKEN) and network access:

    python examples/push_to_hub.py out/eval-card me/my-compressed-model
"""

import sys

from transformers import AutoModelForCausalLM

from hf_compress.hub import push_to_hub


folder, repo_id = sys.argv[1], sys.argv[2]
commit = push_to_hub(folder, repo_id, private=True)
print(f"pushed: {commit.commit_url}")
model = AutoModelForCausalLM.from_pretrained(repo_id)
print(f"loaded back: {type(model).__name__}")
