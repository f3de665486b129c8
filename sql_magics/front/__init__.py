"""The fronts users meet: the IPython magics, the ``rayudf`` command line, the demo, and progress bars."""
