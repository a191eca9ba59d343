"""Write ./vit-b16 and encode scikit-image's astronaut through the saved processor and model, printing the shapes."""

from vlm_vision.demo import main

if __name__ == "__main__":
    main()
