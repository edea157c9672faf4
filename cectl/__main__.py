from cectl.cli import main

main()
