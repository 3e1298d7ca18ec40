from lmforge.cli import entry

if __name__ == "__main__":  # not when a spawned process (lmforge serve's HTTP side) imports this module
    entry()
