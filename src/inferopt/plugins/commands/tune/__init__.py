"""inferopt tune: search the installed techniques for the best recipe within an accuracy budget."""
