if __name__ == "__main__":
    import sys

    from fmnist.cli import main

    sys.exit(main())
