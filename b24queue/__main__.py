from b24queue.cli.main import main

main()
