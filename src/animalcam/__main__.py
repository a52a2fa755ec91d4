"""``python -m animalcam predict ...``: the ``animalcam`` command (:mod:`animalcam.cli`)."""

from animalcam.cli import main

if __name__ == "__main__":
    main()
