from histodetect.cli import app

app(prog_name="histodetect")
