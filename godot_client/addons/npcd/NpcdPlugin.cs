#if TOOLS
using Godot;

namespace NpcdGodot
{
    /// <summary>Registers the project settings and the Npcd autoload.</summary>
    [Tool]
    public partial class NpcdPlugin : EditorPlugin
    {
        private const string AutoloadName = "Npcd";

        public override void _EnterTree()
        {
            NpcdSettings.Register();
            AddAutoloadSingleton(AutoloadName, "res://addons/npcd/NpcdService.cs");
        }

        public override void _ExitTree()
        {
            RemoveAutoloadSingleton(AutoloadName);
        }
    }
}
#endif
