"""Stream processors: the faust app, its topics and one agent module per consumed topic."""
