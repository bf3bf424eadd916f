from rapidin_index.cli import main

main()
