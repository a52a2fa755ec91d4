"""animalcam: train and explain animal-image classifiers."""
