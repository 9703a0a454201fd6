"""Everything that trains the model: data, loop, validation, export. Not needed to run it."""
