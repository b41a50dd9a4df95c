from classifier.cli import cli_main

cli_main()
