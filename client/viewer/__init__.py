"""``fedct serve``: the radiologist's local viewer over ``fedct diagnose``'s results."""
