from classifier.entry import main

main()
