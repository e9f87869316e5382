from kdcache.cli import cli

cli()
