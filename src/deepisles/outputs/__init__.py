"""What a run leaves behind: mask/probability files, report.json, preview.png."""
