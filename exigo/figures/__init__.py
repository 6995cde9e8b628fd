"""Figure machinery shared by the analyses.

- `pool`: figures drawn and rendered to PNG in worker processes while the run goes on.
- `tiles`: grids of images and maps drawn as one picture.
- `colour_scale`: colour scales shared across epochs.
"""
