"""Convert a local checkpoint: python scripts/convert_checkpoint.py --from {hf,clip,...,npz} SRC --out DIR"""

from vlm_vision.conversion.cli import main

if __name__ == "__main__":
    main()
