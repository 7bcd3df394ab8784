"""Running a model on the user's videos: reading inputs, faces, clip windows, plots."""
