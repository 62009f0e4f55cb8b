from kdtrain.cli import main

main()
