"""Write a checkpoint folder for a preset: python scripts/create_checkpoint.py --preset vit-b16 --out ./vit-b16"""

from vlm_vision.export.encoder_folder import main

if __name__ == "__main__":
    main()
