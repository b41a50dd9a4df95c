from classifier.cli.entry import main

main()
