from b24queue.cli import main

main()
