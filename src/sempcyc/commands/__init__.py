"""The CLI's other commands (release, report, serve, ui, cross-artist): not pipeline stages, and leaves like them."""
