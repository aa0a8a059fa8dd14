"""POPE: `python evals/pope.py [flags]` is `vlmfix eval pope [flags]` (docs/evaluation.md).

    python evals/pope.py --data out/emojicoco --world-images 100 --methods none var gift
    accelerate launch --multi_gpu --num_processes 8 evals/pope.py --model llava-hf/llava-1.5-7b-hf \\
        --image-dir /data/coco/val2014 --pope-dir /data/POPE/output/coco --dtype float16
"""

import sys

from vlmfix.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["eval", "pope", *sys.argv[1:]]))
