import sys
def test_x(tiny):
    import birdbone
    print(sys.path[:4], birdbone.__file__, tiny)
