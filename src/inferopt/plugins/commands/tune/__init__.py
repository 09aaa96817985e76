"""inferopt tune: search the installed techniques for the best recipe within a quality budget
(accuracy, or cosine to the baseline's outputs)."""
