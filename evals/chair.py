"""CHAIR: `python evals/chair.py [flags]` is `vlmfix eval chair [flags]` (docs/evaluation.md).

    python evals/chair.py --data out/emojicoco --world-images 100 --n-images 50 --methods none var
    accelerate launch --multi_gpu --num_processes 8 evals/chair.py --model llava-hf/llava-1.5-7b-hf \\
        --image-dir /data/coco/val2014 --instances instances_val2014.json instances_train2014.json \\
        --captions captions_val2014.json captions_train2014.json --n-images 500 --max-new-tokens 512
"""

import sys

from vlmfix.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["eval", "chair", *sys.argv[1:]]))
