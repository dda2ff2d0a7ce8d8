from birdbone.cli import main

main()
