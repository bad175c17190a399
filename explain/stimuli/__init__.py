"""What a study shows and measures, as plain functions on numpy arrays (no Django, no database): the
learning stimuli (``rendering``), the keypoint and cluster metrics of edits (``metrics``) and class pairs
mined from a confusion matrix or attributes (``pairs``)."""
