"""`python -m mllm_cl fit --config configs/llava_saproj.yaml`"""

from mllm_cl.cli import main

if __name__ == "__main__":
    main()
