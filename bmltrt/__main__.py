from bmltrt.cli import main

main()
