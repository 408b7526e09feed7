"""Reading labelled image collections, image preparation, and the synthetic taxonomy."""
